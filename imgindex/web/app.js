// The imgindex page: plain JavaScript over the JSON API. Everything the page shows comes from
// the URL (?view=...&q=...), so a result page can be bookmarked and the back button works.
// Text from the index (file names) is only ever set with textContent, never parsed as HTML.
"use strict";

const $ = (selector) => document.querySelector(selector);
const views = ["search", "browse", "duplicates"];
const PAGE = 60;
let info = null;
let generation = 0; // each render's number: an older one still loading draws nothing
const selection = { like: [], unlike: [] }; // tokens: image ids, or "u:REF" for uploads

function params() {
  return new URLSearchParams(location.search);
}

// Change the URL (and so the page): ``changes`` are set (null removes), the rest is kept, or
// dropped with keep: false (a new view or a new search starts afresh).
function go(changes, { replace = false, keep = true } = {}) {
  const next = keep ? params() : new URLSearchParams();
  for (const [key, value] of Object.entries(changes)) {
    next.delete(key);
    const values = Array.isArray(value) ? value : [value];
    for (const v of values) if (v !== null && v !== undefined && v !== "") next.append(key, v);
  }
  const url = "?" + next.toString();
  if (replace) history.replaceState(null, "", url);
  else history.pushState(null, "", url);
  render();
}

async function api(path, options = {}) {
  const response = await fetch(path, { credentials: "same-origin", ...options });
  let body = null;
  try {
    body = await response.json();
  } catch (e) {
    body = null;
  }
  if (!response.ok) throw new Error((body && body.error) || response.statusText);
  return body;
}

function element(tag, attributes = {}, ...children) {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(attributes)) {
    if (key === "text") node.textContent = value;
    else if (key.startsWith("on")) node.addEventListener(key.slice(2), value);
    else node.setAttribute(key, value);
  }
  for (const child of children) if (child) node.append(child);
  return node;
}

function basename(path) {
  return path.split("/").pop();
}

function shortName(path) {
  // The file and its folder: names like image_0006.jpg recur in every folder.
  return path.split("/").slice(-2).join("/");
}

function status(where, text, isError = false) {
  const node = $(where);
  node.textContent = text || "";
  node.classList.toggle("error", isError);
}

function scoreOf(metric, hit) {
  const score = metric === "l2" ? hit.distance : hit.similarity;
  return (metric === "l2" ? "distance " : "similarity ") + score.toFixed(4);
}

function kilobytes(size) {
  return size >= 1 << 20 ? `${(size / (1 << 20)).toFixed(1)} MB` : `${Math.round(size / 1024)} KB`;
}

// -- cards ----------------------------------------------------------------------------------

function card(image, caption, { selectable = true, extra = [] } = {}) {
  const img = element("img", { src: image.thumbnail, alt: basename(image.path), title: image.path, loading: "lazy" });
  const open = element("button", { type: "button", class: "thumb", title: `more like ${basename(image.path)}`, onclick: () => go({ view: "search", q: String(image.id) }, { keep: false }) }, img);
  const lines = element("div", { class: "caption" });
  for (const line of caption) lines.append(element("div", { text: line }));
  const name = element("div", { class: "name", text: shortName(image.path), title: image.path });
  const tools = element("div", { class: "tools" }, ...extra);
  if (selectable) {
    tools.append(
      element("button", { type: "button", title: "an example to be like", onclick: () => select("like", String(image.id)) }, "+ like"),
      element("button", { type: "button", title: "an example to be unlike", onclick: () => select("unlike", String(image.id)) }, "− unlike"),
    );
  }
  tools.append(element("button", { type: "button", title: "details and nearest images", onclick: () => go({ image: String(image.id) }) }, "details"));
  return element("figure", { class: "card", "data-id": image.id }, open, lines, name, tools);
}

function thumbnailOf(token) {
  return token.startsWith("u:") ? `/api/uploads/${token.slice(2)}/thumbnail` : `/api/images/${token}/thumbnail`;
}

function select(kind, token) {
  const other = kind === "like" ? "unlike" : "like";
  selection[other] = selection[other].filter((t) => t !== token);
  if (!selection[kind].includes(token)) selection[kind].push(token);
  showSelection();
}

function showSelection() {
  const box = $("#selection");
  box.hidden = !selection.like.length && !selection.unlike.length;
  for (const kind of ["like", "unlike"]) {
    $("#sel-" + kind).replaceChildren(...selection[kind].map((t) =>
      element("button", { type: "button", class: "chip", title: "remove", onclick: () => { selection[kind] = selection[kind].filter((x) => x !== t); showSelection(); } },
        element("img", { src: thumbnailOf(t), alt: t.startsWith("u:") ? "an upload" : `image ${t}` }))));
  }
}

// -- search ---------------------------------------------------------------------------------

function searchOptions() {
  const form = new FormData($("#search-controls"));
  return { metric: form.get("metric"), k: form.get("k"), cutoff: form.get("cutoff"), under: form.get("under") };
}

// Show the URL's values in a form's controls: a value the URL does not give (or one the
// control does not offer) shows the control's default, so controls never lag behind the URL.
function fillControls(form, p) {
  for (const field of form.elements) {
    if (!field.name) continue;
    if (field.type === "checkbox") field.checked = p.get(field.name) === "1";
    else if (field.tagName === "SELECT") {
      const wanted = p.get(field.name) || "";
      const offered = [...field.options].some((o) => o.value === wanted);
      field.value = offered ? wanted : field.options[0].value;
    } else field.value = p.has(field.name) ? p.get(field.name) : field.defaultValue;
  }
}

async function renderSearch(p, mine) {
  fillControls($("#search-controls"), p);
  const queries = p.getAll("q");
  const answers = $("#answers");
  answers.replaceChildren();
  if (!queries.length) {
    status("#search-status", "Drop an image to search with it, or pick one in Browse.");
    return;
  }
  status("#search-status", "Searching ...");
  const shown = [];
  try {
    for (const q of queries) {
      const query = new URLSearchParams({ like: q, k: p.get("k") || "20", metric: p.get("metric") || "l2" });
      for (const key of ["cutoff", "under"]) if (p.get(key)) query.set(key, p.get(key));
      if (p.get("unlike") && queries.length === 1) query.set("unlike", p.get("unlike"));
      const [answer] = await api("/api/search?" + query.toString());
      shown.push(showAnswer(answer, q, p.get("unlike")));
    }
    if (mine !== generation) return; // a newer page is being drawn
    answers.replaceChildren(...shown);
    status("#search-status", "");
  } catch (error) {
    if (mine === generation) status("#search-status", error.message, true);
  }
}

function showAnswer(answer, q, unlike) {
  const section = element("section", { class: "answer" });
  const heads = element("div", { class: "query" });
  for (const token of q.split(",").filter(Boolean)) {
    const tools = element("div", { class: "tools" },
      element("button", { type: "button", title: "an example to be like", onclick: () => select("like", token) }, "+ like"),
      element("button", { type: "button", title: "an example to be unlike", onclick: () => select("unlike", token) }, "− unlike"));
    heads.append(element("figure", { class: "query-figure" }, element("img", { src: thumbnailOf(token), alt: "the query", class: "query-image" }), tools));
  }
  const title = element("h2", { text: `Query: ${answer.query}` });
  const meta = element("p", { class: "muted", text: `${answer.results.length} results, ${answer.metric}` + (unlike ? `, unlike ${unlike.split(",").length} image(s)` : "") });
  const grid = element("div", { class: "grid" });
  for (const hit of answer.results) grid.append(card(hit, [`#${hit.rank} · ${scoreOf(answer.metric, hit)}`]));
  if (!answer.results.length) grid.append(element("p", { class: "muted", text: "No results (a cutoff or a folder may leave none)." }));
  section.append(heads, title, meta, grid);
  return section;
}

async function upload(files) {
  files = [...files];
  const images = files.filter((f) => !f.type || f.type.startsWith("image/"));
  const ignored = files.filter((f) => !images.includes(f)).map((f) => f.name);
  if (!images.length) {
    status("#search-status", `Not an image: ${ignored.join(", ")}`, true);
    return;
  }
  $("#answers").replaceChildren();
  const form = new FormData();
  for (const file of images) form.append("image", file, file.name || "pasted image");
  const options = searchOptions();
  for (const [key, value] of Object.entries(options)) if (value) form.append(key, value);
  const combine = $("#combine").checked && images.length > 1;
  if (combine) form.append("combine", "1");
  status("#search-status", `Searching with ${images.length} image(s) ...`);
  try {
    const answers = await api("/api/search", { method: "POST", body: form });
    const good = answers.filter((a) => !a.error);
    const problems = [...answers.filter((a) => a.error).map((a) => a.error), ...ignored.map((n) => `${n}: not an image`)];
    const qs = combine ? [answers[0].uploads.map((r) => "u:" + r).join(",")] : good.map((a) => "u:" + a.upload);
    go({ view: "search", q: qs, unlike: null, image: null, ...options });
    if (problems.length) status("#search-status", "Not searched: " + problems.join("; "), true);
  } catch (error) {
    status("#search-status", error.message, true);
  }
}

// -- browse ---------------------------------------------------------------------------------

async function renderBrowse(p, mine) {
  fillControls($("#browse-controls"), p);
  const page = Math.max(0, parseInt(p.get("page") || "0", 10) || 0);
  const query = new URLSearchParams({ offset: String(page * PAGE), limit: String(PAGE), order: p.get("order") || "newest" });
  if (p.get("under")) query.set("under", p.get("under"));
  status("#browse-status", "Loading ...");
  try {
    const body = await api("/api/images?" + query.toString());
    if (mine !== generation) return;
    const grid = $("#browse-grid");
    grid.replaceChildren(...body.images.map((image) => card(image, [`#${image.id} · ${image.width}×${image.height} · ${kilobytes(image.size)}`])));
    const pages = Math.max(1, Math.ceil(body.total / PAGE));
    $("#page-info").textContent = `page ${Math.min(page, pages - 1) + 1} of ${pages} (${body.total} images)`;
    $("#prev").disabled = page === 0;
    $("#next").disabled = page + 1 >= pages;
    if (!body.total) status("#browse-status", "No images here.");
    else if (page >= pages) status("#browse-status", `There is no page ${page + 1}: the last is ${pages}.`, true);
    else status("#browse-status", "");
  } catch (error) {
    if (mine === generation) status("#browse-status", error.message, true);
  }
}

// -- duplicates -----------------------------------------------------------------------------

async function renderDuplicates(p, mine) {
  const metric = p.get("metric") === "cosine" ? "cosine" : "l2";
  const threshold = p.get("threshold") || String(info.thresholds[metric]);
  fillControls($("#dup-controls"), new URLSearchParams({ metric, threshold, all: p.get("all") || "" }));
  status("#dup-status", "Looking for duplicates ...");
  const query = new URLSearchParams({ metric, threshold });
  if (p.get("all") === "1") query.set("all", "1");
  try {
    const body = await api("/api/duplicates?" + query.toString());
    if (mine !== generation) return;
    $("#groups").replaceChildren(...body.groups.map((group, n) => showGroup(group, n + 1)));
    const what = p.get("all") === "1" ? "group(s), decided ones too" : "group(s) to decide on";
    status("#dup-status", body.groups.length ? `${body.groups.length} ${what} (${metric} ${metric === "l2" ? "≤" : "≥"} ${threshold})` : "No undecided duplicate groups at this threshold.");
  } catch (error) {
    if (mine === generation) {
      $("#groups").replaceChildren();
      status("#dup-status", error.message, true);
    }
  }
  renderMarked(mine);
}

function showGroup(group, number) {
  const ids = group.images.map((image) => image.id);
  const grid = element("div", { class: "grid" });
  for (const image of group.images) {
    const caption = [`#${image.id} · ${image.width}×${image.height} · ${kilobytes(image.size)}`];
    if (image.marked_for_removal) caption.push(`marked for removal, keep #${image.keep}`);
    const keep = element("button", { type: "button", class: "keep", title: "keep this one, mark the others for removal", onclick: () => decide(ids, image.id) }, "keep this");
    const node = card(image, caption, { selectable: false, extra: [keep] });
    if (image.marked_for_removal) node.classList.add("marked");
    grid.append(node);
  }
  const pairs = group.pairs.slice(0, 8).map((pair) => `#${pair.a} ~ #${pair.b}: ${pair.score.toFixed(4)}`).join(" · ");
  const head = element("h3", { text: `Group ${number}: ${group.size} images` + (group.reviewed ? " (decided)" : "") });
  const actions = element("div", { class: "actions" },
    element("button", { type: "button", onclick: () => decide(ids, null) }, "not duplicates"),
    group.reviewed ? element("button", { type: "button", class: "plain", onclick: () => undo(ids) }, "undo the decision") : null);
  return element("section", { class: "group", "data-ids": ids.join(",") }, head, element("p", { class: "muted", text: pairs }), grid, actions);
}

async function decide(ids, keep) {
  try {
    await api("/api/reviews", { method: "POST", headers: { "Content-Type": "application/json" }, body: JSON.stringify({ ids, keep }) });
    await render();
    const done = keep === null ? `Recorded ${ids.map((i) => "#" + i).join(", ")} as not duplicates.` : `Kept #${keep}; marked ${ids.filter((i) => i !== keep).map((i) => "#" + i).join(", ")} for removal.`;
    status("#dup-status", done);
    $("#dup-status").append(" ", element("button", { type: "button", class: "plain", onclick: () => undo(ids) }, "undo"));
  } catch (error) {
    status("#dup-status", error.message, true);
  }
}

async function undo(ids) {
  try {
    await api("/api/reviews/undo", { method: "POST", headers: { "Content-Type": "application/json" }, body: JSON.stringify({ ids }) });
    await render();
  } catch (error) {
    status("#dup-status", error.message, true);
  }
}

async function renderMarked(mine) {
  try {
    const body = await api("/api/reviews");
    if (mine !== generation) return;
    const grid = $("#marked");
    grid.replaceChildren(...body.marked_for_removal.map((row) =>
      card({ id: row.id, path: row.path, thumbnail: `/api/images/${row.id}/thumbnail` }, [`#${row.id} · keep #${row.keep_id ?? "?"}`], { selectable: false })));
    if (!body.marked_for_removal.length) grid.append(element("p", { class: "muted", text: "Nothing is marked for removal." }));
  } catch (error) {
    status("#dup-status", error.message, true);
  }
}

// -- one image's record ---------------------------------------------------------------------

async function renderRecord(p, mine) {
  const panel = $("#record");
  const id = p.get("image");
  panel.hidden = !id;
  if (!id) return;
  const parts = ["#record-top", "#record-links", "#record-nearest"];
  try {
    const record = await api(`/api/images/${encodeURIComponent(id)}`);
    if (mine !== generation) return;
    for (const part of parts) $(part).hidden = false;
    $("#record-error").hidden = true;
    $("#record-image").src = record.thumbnail;
    $("#record-image").alt = record.name;
    const rows = [["file", record.path], ["id", record.id], ["size", kilobytes(record.size)], ["pixels", `${record.width} × ${record.height}`], ["added", record.added_at], ["sha256", record.sha256.slice(0, 16) + "…"]];
    $("#record-facts").replaceChildren(...rows.flatMap(([k, v]) => [element("dt", { text: k }), element("dd", { text: String(v) })]));
    $("#record-file").href = record.file;
    $("#record-search").onclick = (event) => {
      event.preventDefault();
      go({ view: "search", q: String(record.id) }, { keep: false });
    };
    const metric = p.get("metric") === "cosine" ? "cosine" : "l2";
    const [answer] = await api(`/api/search?id=${record.id}&k=12&metric=${metric}`);
    if (mine !== generation) return;
    $("#record-neighbours").replaceChildren(...answer.results.map((hit) => card(hit, [`#${hit.rank} · ${scoreOf(answer.metric, hit)}`], { selectable: false })));
  } catch (error) {
    if (mine !== generation) return;
    for (const part of parts) $(part).hidden = true;
    $("#record-error").hidden = false;
    $("#record-error").textContent = error.message;
  }
}

// -- the whole page -------------------------------------------------------------------------

async function loadFolders() {
  const body = await api("/api/folders");
  for (const select of document.querySelectorAll("select.folders")) {
    for (const folder of body.folders) select.append(element("option", { value: folder.path, text: `${folder.path} (${folder.count})` }));
  }
}

async function render() {
  const mine = ++generation;
  const p = params();
  const view = views.includes(p.get("view")) ? p.get("view") : "search";
  for (const name of views) $("#view-" + name).hidden = name !== view;
  for (const link of document.querySelectorAll("nav a")) {
    link.classList.toggle("active", link.dataset.view === view);
    if (link.dataset.view === view) link.setAttribute("aria-current", "page");
    else link.removeAttribute("aria-current");
  }
  renderRecord(p, mine);
  if (view === "search") await renderSearch(p, mine);
  else if (view === "browse") await renderBrowse(p, mine);
  else await renderDuplicates(p, mine);
}

function wire() {
  for (const link of document.querySelectorAll("nav a")) {
    link.addEventListener("click", (event) => {
      event.preventDefault();
      go({ view: link.dataset.view }, { keep: false });
    });
  }
  const drop = $("#drop");
  const input = $("#file-input");
  $("#choose").addEventListener("click", () => input.click());
  drop.addEventListener("keydown", (event) => {
    if (event.target === drop && (event.key === "Enter" || event.key === " ")) {
      event.preventDefault();
      input.click();
    }
  });
  drop.addEventListener("dragover", (event) => {
    event.preventDefault();
    drop.classList.add("over");
  });
  drop.addEventListener("dragleave", () => drop.classList.remove("over"));
  drop.addEventListener("drop", (event) => {
    event.preventDefault();
    drop.classList.remove("over");
    upload(event.dataTransfer.files);
  });
  input.addEventListener("change", (event) => {
    upload(event.target.files);
    input.value = ""; // the same file chosen again is a new search
  });
  document.addEventListener("paste", (event) => {
    const files = [...((event.clipboardData || {}).items || [])].filter((i) => i.kind === "file").map((i) => i.getAsFile());
    if (files.length) upload(files);
  });
  document.addEventListener("keydown", (event) => {
    if (event.key === "Escape" && !$("#record").hidden) go({ image: null });
  });
  $("#search-controls").addEventListener("change", () => go({ ...searchOptions() }));
  $("#search-controls").addEventListener("submit", (event) => event.preventDefault());
  $("#browse-controls").addEventListener("change", () => {
    const form = new FormData($("#browse-controls"));
    go({ order: form.get("order"), under: form.get("under"), page: null });
  });
  $("#prev").addEventListener("click", () => go({ page: String(Math.max(0, parseInt(params().get("page") || "0", 10) - 1)) }));
  $("#next").addEventListener("click", () => go({ page: String(parseInt(params().get("page") || "0", 10) + 1) }));
  const dupControls = $("#dup-controls");
  dupControls.elements.metric.addEventListener("change", () => {
    dupControls.elements.threshold.value = info.thresholds[dupControls.elements.metric.value];
  });
  const findDuplicates = (event) => {
    if (event) event.preventDefault();
    const form = new FormData(dupControls);
    go({ metric: form.get("metric"), threshold: form.get("threshold"), all: form.get("all") ? "1" : null });
  };
  dupControls.addEventListener("submit", findDuplicates);
  dupControls.addEventListener("change", () => findDuplicates());
  $("#sel-search").addEventListener("click", () => {
    if (!selection.like.length) {
      status("#search-status", "Choose at least one image to be like (+ like).", true);
      return;
    }
    go({ view: "search", q: selection.like.join(","), unlike: selection.unlike.join(","), image: null });
    selection.like = [];
    selection.unlike = [];
    showSelection();
  });
  $("#sel-clear").addEventListener("click", () => {
    selection.like = [];
    selection.unlike = [];
    showSelection();
  });
  $("#record-close").addEventListener("click", () => go({ image: null }));
  window.addEventListener("popstate", render);
}

async function start() {
  wire();
  try {
    info = await api("/api/info");
    $("#move-command").textContent = `imgindex review move FOLDER --index ${info.path}`;
    await loadFolders();
  } catch (error) {
    status("#search-status", error.message, true);
    return;
  }
  await render();
}

document.addEventListener("DOMContentLoaded", start);
