"""imgsim's usage example, run with imgindex in its place.

Only the import line differs from code written for imgsim. Run it in a folder holding img0.png
and img1.png of the same size (the batch line stacks them into one array); OpenCV is needed by
this example's own cv2.imread, not by imgindex.
"""

import cv2
import numpy as np

import imgindex as imgsim

vtr = imgsim.Vectorizer()

img0 = cv2.imread("img0.png")
img1 = cv2.imread("img1.png")

vec0 = vtr.vectorize(img0)
vec1 = vtr.vectorize(img1)
vecs = vtr.vectorize(np.array([img0, img1]))

dist = imgsim.distance(vec0, vec1)
print("distance =", dist)

dist = imgsim.distance(vecs[0], vecs[1])
print("distance =", dist)
