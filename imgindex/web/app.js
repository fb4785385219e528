// The imgindex page: plain JavaScript over the JSON API. Everything the page shows comes from
// the URL (?view=...&q=...), so a result page can be bookmarked and the back button works.
// Text from the index (file names) is only ever set with textContent, never parsed as HTML.
"use strict";

const $ = (selector) => document.querySelector(selector);
const views = ["search", "browse", "duplicates"];
const PAGE = 60;
let info = null;
const selection = { like: [], unlike: [] }; // tokens: image ids, or "u:REF" for uploads

function params() {
  return new URLSearchParams(location.search);
}

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

function status(where, text, isError = false) {
  const node = $(where);
  node.textContent = text || "";
  node.classList.toggle("error", isError);
}

function formatScore(metric, hit) {
  const score = metric === "l2" ? hit.distance : hit.similarity;
  return (metric === "l2" ? "distance " : "similarity ") + score.toFixed(4);
}

// -- cards ----------------------------------------------------------------------------------

function card(image, caption, { selectable = true } = {}) {
  const img = element("img", { src: image.thumbnail, alt: basename(image.path), title: image.path, loading: "lazy" });
  const open = element("button", { type: "button", class: "thumb", title: "more like this", onclick: () => go({ view: "search", q: String(image.id), unlike: null }, { keep: false }) }, img);
  const lines = element("div", { class: "caption" });
  for (const line of caption) lines.append(element("div", { text: line }));
  const name = element("div", { class: "name", text: basename(image.path), title: image.path });
  const node = element("figure", { class: "card", "data-id": image.id }, open, lines, name);
  const tools = element("div", { class: "tools" });
  if (selectable) {
    tools.append(
      element("button", { type: "button", title: "like this", onclick: () => select("like", String(image.id)) }, "+"),
      element("button", { type: "button", title: "unlike this", onclick: () => select("unlike", String(image.id)) }, "−"),
    );
  }
  tools.append(element("button", { type: "button", title: "details", onclick: () => go({ image: String(image.id) }) }, "i"));
  node.append(tools);
  return node;
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
    const chips = $("#sel-" + kind);
    chips.replaceChildren(...selection[kind].map((t) => element("span", { class: "chip", text: t.startsWith("u:") ? "upload" : "#" + t })));
  }
}

// -- search ---------------------------------------------------------------------------------

function searchOptions() {
  const form = new FormData($("#search-controls"));
  return { metric: form.get("metric"), k: form.get("k"), cutoff: form.get("cutoff"), under: form.get("under") };
}

function fillControls(form, p) {
  for (const field of form.elements) {
    if (!field.name || !p.has(field.name)) continue;
    if (field.type === "checkbox") field.checked = p.get(field.name) === "1";
    else field.value = p.get(field.name);
  }
}

async function renderSearch(p) {
  fillControls($("#search-controls"), p);
  const queries = p.getAll("q");
  const answers = $("#answers");
  answers.replaceChildren();
  if (!queries.length) {
    status("#search-status", "Drop an image to search with it.");
    return;
  }
  status("#search-status", "Searching ...");
  try {
    for (const q of queries) {
      const query = new URLSearchParams({ like: q, k: p.get("k") || "20", metric: p.get("metric") || "l2" });
      for (const key of ["cutoff", "under"]) if (p.get(key)) query.set(key, p.get(key));
      if (p.get("unlike") && queries.length === 1) query.set("unlike", p.get("unlike"));
      const [answer] = await api("/api/search?" + query.toString());
      answers.append(showAnswer(answer, q, p.get("unlike")));
    }
    status("#search-status", "");
  } catch (error) {
    status("#search-status", error.message, true);
  }
}

function showAnswer(answer, q, unlike) {
  const section = element("section", { class: "answer" });
  const heads = element("div", { class: "query" });
  const tokens = q.split(",").filter(Boolean);
  for (const token of tokens) {
    const src = token.startsWith("u:") ? `/api/uploads/${token.slice(2)}/thumbnail` : `/api/images/${token}/thumbnail`;
    heads.append(element("img", { src, alt: "query", class: "query-image" }));
  }
  const title = element("h2", { text: `Query: ${answer.query}` });
  const meta = element("p", { class: "muted", text: `${answer.results.length} results, ${answer.metric}` + (unlike ? `, unlike ${unlike}` : "") });
  const grid = element("div", { class: "grid" });
  for (const hit of answer.results) grid.append(card(hit, [`#${hit.rank} · ${formatScore(answer.metric, hit)}`]));
  if (!answer.results.length) grid.append(element("p", { class: "muted", text: "No results." }));
  section.append(heads, title, meta, grid);
  return section;
}

async function upload(files) {
  files = [...files].filter((f) => f.type.startsWith("image/") || !f.type);
  if (!files.length) return;
  const form = new FormData();
  for (const file of files) form.append("image", file, file.name || "pasted image");
  const options = searchOptions();
  for (const [key, value] of Object.entries(options)) if (value) form.append(key, value);
  const combine = $("#combine").checked && files.length > 1;
  if (combine) form.append("combine", "1");
  status("#search-status", `Uploading ${files.length} image(s) ...`);
  try {
    const answers = await api("/api/search", { method: "POST", body: form });
    const qs = combine ? [answers[0].uploads.map((r) => "u:" + r).join(",")] : answers.map((a) => "u:" + a.upload);
    go({ view: "search", q: qs, unlike: null, image: null });
  } catch (error) {
    status("#search-status", error.message, true);
  }
}

// -- browse ---------------------------------------------------------------------------------

async function renderBrowse(p) {
  fillControls($("#browse-controls"), p);
  const page = Math.max(0, parseInt(p.get("page") || "0", 10) || 0);
  const query = new URLSearchParams({ offset: String(page * PAGE), limit: String(PAGE), order: p.get("order") || "newest" });
  if (p.get("under")) query.set("under", p.get("under"));
  status("#browse-status", "Loading ...");
  try {
    const body = await api("/api/images?" + query.toString());
    const grid = $("#browse-grid");
    grid.replaceChildren(...body.images.map((image) => card(image, [`#${image.id} · ${image.width}×${image.height}`])));
    const pages = Math.max(1, Math.ceil(body.total / PAGE));
    $("#page-info").textContent = `page ${page + 1} of ${pages} (${body.total} images)`;
    $("#prev").disabled = page === 0;
    $("#next").disabled = page + 1 >= pages;
    status("#browse-status", body.total ? "" : "No images here.");
  } catch (error) {
    status("#browse-status", error.message, true);
  }
}

// -- duplicates -----------------------------------------------------------------------------

async function renderDuplicates(p) {
  const metric = p.get("metric") || "l2";
  const threshold = p.get("threshold") || String(info.thresholds[metric]);
  fillControls($("#dup-controls"), new URLSearchParams({ metric, threshold, all: p.get("all") || "" }));
  status("#dup-status", "Looking for duplicates ...");
  const query = new URLSearchParams({ metric, threshold });
  if (p.get("all") === "1") query.set("all", "1");
  try {
    const body = await api("/api/duplicates?" + query.toString());
    const groups = $("#groups");
    groups.replaceChildren(...body.groups.map((group, n) => showGroup(group, n + 1, metric)));
    status("#dup-status", body.groups.length ? `${body.groups.length} group(s) to decide on` + (p.get("all") === "1" ? " (decided ones too)" : "") : "No undecided duplicate groups at this threshold.");
  } catch (error) {
    status("#dup-status", error.message, true);
  }
  renderMarked();
}

function showGroup(group, number, metric) {
  const ids = group.images.map((image) => image.id);
  const grid = element("div", { class: "grid" });
  for (const image of group.images) {
    const caption = [`#${image.id}` + (image.marked_for_removal ? ` · marked, keep #${image.keep}` : "")];
    const node = card({ ...image, thumbnail: `/api/images/${image.id}/thumbnail` }, caption, { selectable: false });
    node.querySelector(".tools").prepend(element("button", { type: "button", class: "keep", title: "keep this one, mark the others for removal", onclick: () => decide(ids, image.id) }, "keep"));
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
    render();
  } catch (error) {
    status("#dup-status", error.message, true);
  }
}

async function undo(ids) {
  try {
    await api("/api/reviews/undo", { method: "POST", headers: { "Content-Type": "application/json" }, body: JSON.stringify({ ids }) });
    render();
  } catch (error) {
    status("#dup-status", error.message, true);
  }
}

async function renderMarked() {
  try {
    const body = await api("/api/reviews");
    const grid = $("#marked");
    grid.replaceChildren(...body.marked_for_removal.map((row) =>
      card({ id: row.id, path: row.path, thumbnail: `/api/images/${row.id}/thumbnail` }, [`#${row.id} · keep #${row.keep_id ?? "?"}`], { selectable: false })));
    if (!body.marked_for_removal.length) grid.append(element("p", { class: "muted", text: "Nothing is marked for removal." }));
  } catch (error) {
    status("#dup-status", error.message, true);
  }
}

// -- one image's record ---------------------------------------------------------------------

async function renderRecord(p) {
  const panel = $("#record");
  const id = p.get("image");
  panel.hidden = !id;
  if (!id) return;
  try {
    const record = await api(`/api/images/${encodeURIComponent(id)}`);
    $("#record-image").src = record.thumbnail;
    $("#record-image").alt = record.name;
    const facts = $("#record-facts");
    const rows = [["file", record.path], ["id", record.id], ["size", `${(record.size / 1024).toFixed(1)} KB`], ["pixels", `${record.width} × ${record.height}`], ["added", record.added_at], ["sha256", record.sha256.slice(0, 16) + "…"]];
    facts.replaceChildren(...rows.flatMap(([k, v]) => [element("dt", { text: k }), element("dd", { text: String(v) })]));
    $("#record-file").href = record.file;
    $("#record-search").onclick = (event) => {
      event.preventDefault();
      go({ view: "search", q: String(record.id), image: null, unlike: null });
    };
    const [answer] = await api(`/api/search?id=${record.id}&k=12`);
    $("#record-neighbours").replaceChildren(...answer.results.map((hit) => card(hit, [`#${hit.rank} · ${formatScore(answer.metric, hit)}`])));
  } catch (error) {
    $("#record-facts").replaceChildren(element("dd", { class: "error", text: error.message }));
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
  const p = params();
  const view = views.includes(p.get("view")) ? p.get("view") : "search";
  for (const name of views) $("#view-" + name).hidden = name !== view;
  for (const link of document.querySelectorAll("nav a")) link.classList.toggle("active", link.dataset.view === view);
  renderRecord(p);
  if (view === "search") await renderSearch(p);
  else if (view === "browse") await renderBrowse(p);
  else await renderDuplicates(p);
}

function wire() {
  for (const link of document.querySelectorAll("nav a")) {
    link.addEventListener("click", (event) => {
      event.preventDefault();
      go({ view: link.dataset.view, image: null });
    });
  }
  const drop = $("#drop");
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
  $("#file-input").addEventListener("change", (event) => upload(event.target.files));
  document.addEventListener("paste", (event) => {
    const files = [...(event.clipboardData || {}).items || []].filter((i) => i.kind === "file").map((i) => i.getAsFile());
    if (files.length) upload(files);
  });
  $("#search-controls").addEventListener("change", () => go({ ...searchOptions() }));
  $("#search-controls").addEventListener("submit", (event) => event.preventDefault());
  $("#browse-controls").addEventListener("change", () => {
    const form = new FormData($("#browse-controls"));
    go({ order: form.get("order"), under: form.get("under"), page: null });
  });
  $("#prev").addEventListener("click", () => go({ page: String(Math.max(0, parseInt(params().get("page") || "0", 10) - 1)) }));
  $("#next").addEventListener("click", () => go({ page: String(parseInt(params().get("page") || "0", 10) + 1) }));
  $("#dup-controls").addEventListener("submit", (event) => {
    event.preventDefault();
    const form = new FormData($("#dup-controls"));
    go({ metric: form.get("metric"), threshold: form.get("threshold"), all: form.get("all") ? "1" : null });
  });
  $("#sel-search").addEventListener("click", () => {
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
