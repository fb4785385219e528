# The two quick-start commands (see README.md):
#   make demo   install into .venv, index data/ and query it
#   make test   install into .venv, lint, run the test suite
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp
TEST_STAMP := $(VENV)/.test-stamp
DEMO_INDEX := .demo-index

.PHONY: install demo test lint browser bench clean

# imgsim 0.1.2 is installed only for its model.pth (the AugNet weights); --no-deps keeps its
# OpenCV requirement out, since imgindex never imports imgsim or OpenCV. (pip then reports
# "imgsim requires opencv-python, which is not installed"; that is expected.)
$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -e '.[test,serve]'
	$(BIN)/python -m pip install --quiet --disable-pip-version-check --no-deps imgsim==0.1.2
	touch $(STAMP)

# The tests also run the Ray engine and every photo format (imgindex[ray,heif,jxl,raw]); the
# demo needs none of them.
$(TEST_STAMP): $(STAMP)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -e '.[test,serve,ray,heif,jxl,raw]'
	touch $(TEST_STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/imgindex build data --index $(DEMO_INDEX)
	$(BIN)/imgindex query data/pizza/image_0001.jpg data/stop_sign/image_0002.jpg \
		--index $(DEMO_INDEX) -k 5
	$(BIN)/imgindex query data/Leopards/image_0003.jpg --index $(DEMO_INDEX) -k 5 --metric cosine

lint: $(TEST_STAMP)
	$(BIN)/ruff check imgindex tests benchmarks scripts examples
	$(BIN)/ruff format --check imgindex tests benchmarks scripts examples

# The browser test drives Debian's Chromium (never one Playwright downloads). Installed here when
# missing and run as root (as CI does); otherwise that one test is skipped, and says why.
browser:
	@test -x /usr/bin/chromium || { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null && \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq \
		chromium chromium-driver >/dev/null; } || \
		echo "No /usr/bin/chromium (apt-get install chromium chromium-driver): the browser test is skipped"

test: lint browser
	$(BIN)/python -m pytest

bench: $(STAMP)
	$(BIN)/python benchmarks/ingest.py
	$(BIN)/python benchmarks/retrieval_quality.py
	$(BIN)/python benchmarks/retrieval_quality.py --preset fast

clean:
	rm -rf $(VENV) $(DEMO_INDEX)
