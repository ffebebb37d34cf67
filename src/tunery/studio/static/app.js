/* Tunery Studio front end: plain JS, no build step, no network beyond this server. */
"use strict";

// ---------------------------------------------------------------------------- helpers
const $ = (sel, root = document) => root.querySelector(sel);

function h(tag, props, ...children) {
  const el = document.createElement(tag);
  for (const [k, v] of Object.entries(props || {})) {
    if (v === null || v === undefined || v === false) continue;
    if (k === "class") el.className = v;
    else if (k === "dataset") Object.assign(el.dataset, v);
    else if (k === "style" && typeof v === "object") Object.assign(el.style, v);
    else if (k.startsWith("on") && typeof v === "function") el.addEventListener(k.slice(2), v);
    else if (k === "value") el.value = v;
    else if (k === "checked") el.checked = !!v;
    else if (v === true) el.setAttribute(k, "");
    else el.setAttribute(k, v);
  }
  for (const c of children.flat(Infinity)) {
    if (c === null || c === undefined || c === false) continue;
    el.append(c instanceof Node ? c : document.createTextNode(String(c)));
  }
  return el;
}

async function api(method, url, body) {
  const opts = { method, headers: { "X-Tunery": "1" } };
  if (body !== undefined) {
    opts.headers["Content-Type"] = "application/json";
    opts.body = JSON.stringify(body);
  }
  const res = await fetch(url, opts);
  let data = null;
  const text = await res.text();
  try { data = text ? JSON.parse(text) : null; } catch { data = { detail: text }; }
  if (!res.ok) {
    const err = new Error((data && (data.detail || data.message)) || `${res.status} ${res.statusText}`);
    err.status = res.status;
    err.data = data;
    throw err;
  }
  return data;
}

function toast(text, bad = false) {
  const t = h("div", { class: "toast" + (bad ? " bad" : "") }, text);
  $("#toasts").append(t);
  setTimeout(() => t.remove(), bad ? 7000 : 3500);
}

const fmt = {
  dur(s) {
    if (s === null || s === undefined || !isFinite(s)) return "—";
    s = Math.max(0, Math.round(s));
    const hh = Math.floor(s / 3600), mm = Math.floor((s % 3600) / 60), ss = s % 60;
    return hh ? `${hh}h ${String(mm).padStart(2, "0")}m` : mm ? `${mm}m ${String(ss).padStart(2, "0")}s` : `${ss}s`;
  },
  when(t) {
    if (!t) return "—";
    const d = new Date(t * 1000), now = new Date();
    const time = d.toLocaleTimeString([], { hour: "2-digit", minute: "2-digit" });
    if (d.toDateString() === now.toDateString()) return `today ${time}`;
    return `${d.toLocaleDateString([], { month: "short", day: "numeric" })} ${time}`;
  },
  num(v, digits = 4) {
    if (v === null || v === undefined || !isFinite(v)) return "—";
    if (v !== 0 && (Math.abs(v) < 1e-3 || Math.abs(v) >= 1e6)) return v.toExponential(2);
    return Number(v.toFixed(digits)).toString();
  },
  bytes(n) {
    if (n === null || n === undefined) return "—";
    const u = ["B", "KB", "MB", "GB", "TB"];
    let i = 0;
    while (n >= 1024 && i < u.length - 1) { n /= 1024; i++; }
    return `${n.toFixed(i ? 1 : 0)} ${u[i]}`;
  },
};

function slug(s) { return String(s).toLowerCase().replace(/[^a-z0-9._-]+/g, "-").replace(/^-+|-+$/g, "") || "model"; }

function badge(state) { return h("span", { class: `badge ${state}`, dataset: { state } }, state); }

// A page gets a `cleanup` list; everything live (timers, streams, observers) registers there.
let cleanup = [];
function onLeave(fn) { cleanup.push(fn); }
function every(ms, fn) { const id = setInterval(fn, ms); onLeave(() => clearInterval(id)); }

let info = null;
async function getInfo() { if (!info) info = await api("GET", "/api/info"); return info; }

// ---------------------------------------------------------------------------- router
const routes = [
  [/^#\/runs?$/, pageRuns, "runs"],
  [/^#\/new$/, pageNew, "new"],
  [/^#\/run\/(\d+)$/, pageRun, "runs"],
  [/^#\/chat(?:\/(\d+))?(?:\?(.*))?$/, pageChat, "chat"],
];

function route() {
  for (const fn of cleanup.splice(0)) { try { fn(); } catch (e) { console.error(e); } }
  const hash = location.hash || "#/runs";
  const view = $("#view");
  view.replaceChildren();
  for (const [re, page, nav] of routes) {
    const m = hash.match(re);
    if (m) {
      document.querySelectorAll(".mainnav a").forEach(a => a.classList.toggle("active", a.dataset.nav === nav));
      page(view, ...m.slice(1)).catch(e => view.append(h("div", { class: "notice bad" }, String(e.message || e))));
      window.scrollTo(0, 0);
      return;
    }
  }
  location.hash = "#/runs";
}
window.addEventListener("hashchange", route);
window.addEventListener("DOMContentLoaded", route);

// ---------------------------------------------------------------------------- runs list
async function pageRuns(view) {
  document.title = "Runs · Tunery Studio";
  const body = h("div");
  view.append(
    h("div", { class: "pagehead" },
      h("div", { class: "grow" }, h("h1", {}, "Runs"), h("div", { class: "meta", id: "runs-meta" })),
      h("a", { class: "btn primary", href: "#/new" }, "+ New run")),
    body);
  let first = true;
  async function load() {
    let data;
    try { data = await api("GET", "/api/runs"); } catch (e) { if (first) body.replaceChildren(h("div", { class: "notice bad" }, e.message)); return; }
    first = false;
    getInfo().then(inf => {
      const meta = $("#runs-meta");
      if (meta) meta.textContent = `${data.runs.length} run${data.runs.length === 1 ? "" : "s"} in ${inf.runs_dir}`;
    }).catch(() => {});
    if (!data.runs.length) {
      body.replaceChildren(h("div", { class: "card empty" },
        h("div", {}, "No runs yet. Runs started here or with ", h("code", {}, "tunery train"), " in this folder appear here."),
        h("a", { class: "btn primary", href: "#/new" }, "Start a run")));
      return;
    }
    const rows = data.runs.map(r => {
      const prog = r.total_steps ? `${r.step ?? 0} / ${r.total_steps} steps` : "";
      return h("tr", { dataset: { id: r.id }, onclick: () => { location.hash = `#/run/${r.id}`; } },
        h("td", { class: "c-name" }, h("a", { class: "name", href: `#/run/${r.id}` }, r.name),
          h("div", { class: "sub" }, r.source === "cli" ? "from the CLI" : "from the Studio")),
        h("td", { class: "c-state" }, badge(r.state), prog ? h("div", { class: "sub" }, prog) : null),
        h("td", { "data-label": "Method" }, r.method || "—"),
        h("td", { "data-label": "Model" }, r.model || "—"),
        h("td", { "data-label": "Dataset" }, r.dataset || "—"),
        h("td", { class: "num", "data-label": "Started" }, fmt.when(r.started)),
        h("td", { class: "num", "data-label": "Duration" }, fmt.dur(r.duration_s)),
        h("td", { class: "num", "data-label": "Last loss" }, fmt.num(r.last_loss)));
    });
    body.replaceChildren(h("div", { class: "card flush" }, h("table", { class: "runs", id: "runs-table" },
      h("thead", {}, h("tr", {}, ["Name", "Status", "Method", "Model", "Dataset", "Started", "Duration", "Last loss"].map(t => h("th", {}, t)))),
      h("tbody", {}, rows))));
  }
  await load();
  every(3000, load);
}

// ---------------------------------------------------------------------------- new run
const FORMATS = {
  alpaca: { label: "alpaca (instruction, output)", fields: [["field_instruction", "Instruction field", "instruction"], ["field_input", "Input field", "input"], ["field_output", "Output field", "output"]] },
  chat_template: { label: "chat messages", fields: [["field_messages", "Messages field", "messages"]] },
  sharegpt: { label: "sharegpt", fields: [["field_messages", "Conversations field", "conversations"]] },
  completion: { label: "completion (raw text)", fields: [["field", "Text field", "text"]] },
  input_output: { label: "labelled segments", fields: [] },
  preference: { label: "preference pairs", fields: [["field_prompt", "Prompt field", "prompt"], ["field_chosen", "Chosen field", "chosen"], ["field_rejected", "Rejected field", "rejected"]] },
  kto: { label: "kto (labelled)", fields: [["field_prompt", "Prompt field", "prompt"], ["field_completion", "Completion field", "completion"], ["field_label", "Label field", "label"]] },
  prm: { label: "prm (step labels)", fields: [] },
  prompts: { label: "prompts (GRPO)", fields: [["field_prompt", "Prompt field", "prompt"]] },
};
const METHODS = [["sft", "SFT"], ["dpo", "DPO"], ["kto", "KTO"], ["orpo", "ORPO"], ["simpo", "SimPO"], ["rm", "Reward model"], ["prm", "Process reward model"], ["grpo", "GRPO"]];
const METHOD_FORMAT = { sft: "alpaca", dpo: "preference", orpo: "preference", simpo: "preference", rm: "preference", kto: "kto", prm: "prm", grpo: "prompts" };

function field(label, input, hint) {
  return h("label", { class: "field" }, label, input, hint ? h("span", { class: "hint" }, hint) : null);
}
function num(name, value, attrs = {}) { return h("input", { type: "number", name, value, step: "any", ...attrs }); }
function text(name, value, attrs = {}) { return h("input", { type: "text", name, value, autocomplete: "off", spellcheck: "false", ...attrs }); }
function select(name, options, value) {
  return h("select", { name }, options.map(([v, l]) => h("option", { value: v, selected: v === value }, l)));
}
function check(name, label, checked) {
  return h("label", { class: "check" }, h("input", { type: "checkbox", name, checked }), label);
}

async function pageNew(view) {
  document.title = "New run · Tunery Studio";
  const inf = await getInfo();
  const form = h("form", { id: "newrun-form", autocomplete: "off", onsubmit: e => e.preventDefault() });
  const stamp = new Date().toISOString().slice(0, 16).replace(/[-:]/g, "").replace("T", "-");

  const modelPath = text("model_path", "", { placeholder: "/path/to/hf-model-folder or model.gguf", list: "model-list" });
  const dataPath = text("data_path", "", { placeholder: "/path/to/train.jsonl", list: "data-list", required: true });
  const fileInput = h("input", { type: "file", accept: ".json,.jsonl,.parquet,.csv,.arrow,.txt", class: "hidden", id: "upload-input" });
  const uploadState = h("span", { id: "upload-state" }, `or drop a file here · up to ${fmt.bytes(inf.max_upload_bytes)}`);
  const formatSel = select("format", Object.entries(FORMATS).map(([k, v]) => [k, v.label]), "alpaca");
  const fieldsBox = h("div", { class: "grid" });
  const methodSel = select("method", METHODS, "sft");
  const methodExtra = h("div", { class: "grid" });

  const drop = h("div", { class: "dropzone" },
    h("button", { type: "button", class: "btn small", onclick: () => fileInput.click() }, "Upload a file…"), uploadState, fileInput);

  form.append(
    h("section", { class: "card" }, h("h2", {}, "Run"),
      h("div", { class: "grid two" }, field("Name", text("name", `run-${stamp}`, { id: "run-name" }), "the folder under the runs directory"))),
    h("section", { class: "card" }, h("h2", {}, "Model"),
      h("div", { class: "seg", role: "radiogroup" },
        h("label", {}, h("input", { type: "radio", name: "model_kind", value: "default", checked: true }), "Embedded SmolLM2-135M"),
        h("label", {}, h("input", { type: "radio", name: "model_kind", value: "path" }), "Local folder or GGUF")),
      h("div", { class: "hidden", id: "model-path-box", style: { marginTop: "12px" } },
        field("Model path", modelPath, inf.model_roots.length ? `inside ${[inf.runs_dir, ...inf.model_roots].join(", ")}` : `inside ${inf.runs_dir} (TUNERY_STUDIO_MODEL_ROOTS allows more folders)`))),
    h("section", { class: "card" }, h("h2", {}, "Data"),
      h("div", { class: "stack" },
        field("Dataset", dataPath, inf.data_roots.length ? `inside ${[inf.runs_dir, ...inf.data_roots].join(", ")}` : `inside ${inf.runs_dir} (TUNERY_STUDIO_DATA_ROOTS allows more folders)`),
        drop,
        h("div", { class: "grid two" }, field("Format", formatSel), field("Held out for eval", num("val_set_size", "", { min: 0, placeholder: "0 (fraction or rows)" }))),
        fieldsBox)),
    h("section", { class: "card" }, h("h2", {}, "Method"),
      h("div", { class: "grid" },
        field("Method", methodSel),
        field("Adapter", select("adapter", [["lora", "LoRA"], ["qlora", "QLoRA (4-bit base)"], ["full", "Full fine-tune"]], "lora")),
        field("LoRA rank", num("lora_r", 16, { min: 1, step: 1 })),
        field("LoRA alpha", num("lora_alpha", 32, { min: 0 })),
        field("LoRA dropout", num("lora_dropout", 0, { min: 0, max: 0.99 })),
        check("lora_target_linear", "All linear layers", true)),
      methodExtra),
    h("section", { class: "card" }, h("h2", {}, "Training"),
      h("div", { class: "grid" },
        field("Learning rate", num("learning_rate", 0.0002, { min: 0 })),
        field("Epochs", num("num_epochs", 1, { min: 0 })),
        field("Max steps", num("max_steps", "", { min: 1, step: 1, placeholder: "from epochs" })),
        field("Micro-batch size", num("micro_batch_size", 1, { min: 1, step: 1 })),
        field("Grad. accumulation", num("gradient_accumulation_steps", 1, { min: 1, step: 1 })),
        field("Sequence length", num("sequence_len", 2048, { min: 8, step: 1 })),
        field("LR schedule", select("lr_scheduler", [["cosine", "cosine"], ["linear", "linear"], ["constant", "constant"]], "cosine")),
        field("Warmup ratio", num("warmup_ratio", 0.05, { min: 0, max: 1 })),
        field("Eval every N steps", num("eval_steps", "", { min: 1, step: 1, placeholder: "end only" })),
        field("Checkpoint every N", num("save_steps", "", { min: 1, step: 1, placeholder: "on stop / end" })),
        field("Seed", num("seed", 42, { step: 1 })),
        field("Grad. checkpointing", select("gradient_checkpointing", [["false", "off"], ["true", "on"], ["offload", "offload"]], "false")),
        check("sample_packing", "Sample packing", false),
        check("train_on_inputs", "Train on prompts too", false))),
    h("section", { class: "card" }, h("details", { class: "adv" }, h("summary", {}, "Advanced: extra YAML keys"),
      field("Merged over the form (same keys as a config file)", h("textarea", { name: "advanced", rows: 5, placeholder: "bf16: auto\nweight_decay: 0.01" })))),
    h("datalist", { id: "model-list" }), h("datalist", { id: "data-list" }));

  // Right-hand side: validation, preview, plan, YAML, launch.
  const status = h("div", { id: "check-status", class: "notice" }, "Checking…");
  const launchBtn = h("button", { type: "button", class: "btn primary", id: "launch", disabled: true, style: { width: "100%" } }, "Launch training");
  const tabBodies = {
    preview: h("div", { id: "tab-preview" }, h("div", { class: "muted" }, "See how a few examples are rendered and which tokens are trained."),
      h("button", { type: "button", class: "btn", id: "preview-btn", style: { marginTop: "10px" } }, "Show examples")),
    plan: h("div", { id: "tab-plan", class: "hidden" },
      h("div", { class: "row" }, h("input", { type: "text", id: "gpu-mem", placeholder: "GPU memory, e.g. 24GiB (default: this GPU's)", style: { flex: "1", minWidth: "0" } }),
        h("button", { type: "button", class: "btn", id: "plan-btn" }, "Plan memory")),
      h("div", { id: "plan-out", style: { marginTop: "10px" } })),
    yaml: h("div", { id: "tab-yaml", class: "hidden" }, h("pre", { class: "box light", id: "yaml-out" }, ""),
      h("div", { class: "row", style: { marginTop: "10px" } }, h("button", { type: "button", class: "btn", id: "yaml-dl" }, "Download YAML"))),
  };
  const tabs = h("div", { class: "tabs", role: "tablist" }, [["preview", "Preview"], ["plan", "Memory"], ["yaml", "YAML"]].map(([k, l], i) =>
    h("button", { type: "button", class: i === 0 ? "active" : "", dataset: { tab: k }, onclick: e => {
      tabs.querySelectorAll("button").forEach(b => b.classList.toggle("active", b === e.currentTarget));
      for (const [name, el] of Object.entries(tabBodies)) el.classList.toggle("hidden", name !== k);
    } }, l)));
  const aside = h("aside", {}, h("div", { class: "card stack" }, h("h2", {}, "Before launch"), status, launchBtn),
    h("div", { class: "card" }, tabs, Object.values(tabBodies)));

  view.append(h("div", { class: "pagehead" }, h("div", { class: "grow" }, h("h1", {}, "New run"),
    h("div", { class: "meta" }, "Checked live against the same schema as ", h("code", {}, "tunery validate"), "."))),
    h("div", { class: "newrun" }, form, aside));

  // Dynamic parts of the form.
  function renderFields() {
    const f = FORMATS[formatSel.value];
    const old = Object.fromEntries([...fieldsBox.querySelectorAll("input")].map(i => [i.name, i.value]));
    fieldsBox.replaceChildren(...f.fields.map(([key, label, ph]) => field(label, text(key, old[key] || "", { placeholder: ph, dataset: { dsfield: "1" } }))));
  }
  function renderMethodExtra() {
    const m = methodSel.value;
    const items = [];
    if (["dpo", "orpo", "simpo", "kto"].includes(m)) items.push(field("Beta", num("rl_beta", 0.1, { min: 0 })));
    if (m === "grpo") {
      items.push(field("Generations per prompt", num("grpo_num_generations", 8, { min: 2, step: 1 })));
      items.push(field("Rewards (built-in names)", text("grpo_reward_funcs", "gsm8k_answer"), "comma-separated; custom code only from the CLI"));
    }
    methodExtra.replaceChildren(...items);
    methodExtra.style.marginTop = items.length ? "12px" : "0";
  }
  formatSel.addEventListener("change", () => { renderFields(); schedule(); });
  methodSel.addEventListener("change", () => {
    renderMethodExtra();
    const want = METHOD_FORMAT[methodSel.value];
    if (want && formatSel.value !== want && !(want === "alpaca" && ["chat_template", "sharegpt", "completion", "input_output"].includes(formatSel.value))) {
      formatSel.value = want; renderFields();
    }
    schedule();
  });
  form.querySelectorAll("input[name=model_kind]").forEach(r => r.addEventListener("change", () => {
    $("#model-path-box").classList.toggle("hidden", form.model_kind.value !== "path");
    schedule();
  }));
  renderFields();
  renderMethodExtra();

  // Suggestions for the path boxes.
  api("GET", "/api/files?kind=data").then(d => $("#data-list").replaceChildren(...d.files.map(f => h("option", { value: f.path }, f.name)))).catch(() => {});
  api("GET", "/api/files?kind=model").then(d => $("#model-list").replaceChildren(...d.files.map(f => h("option", { value: f.path }, f.name)))).catch(() => {});

  // Upload: button or drag and drop.
  async function upload(file) {
    if (file.size > inf.max_upload_bytes) { toast(`${file.name} is larger than the upload limit (${fmt.bytes(inf.max_upload_bytes)})`, true); return; }
    uploadState.textContent = `uploading ${file.name}…`;
    try {
      const res = await fetch(`/api/uploads?filename=${encodeURIComponent(file.name)}`, { method: "POST", headers: { "X-Tunery": "1" }, body: file });
      const d = await res.json();
      if (!res.ok) throw new Error(d.detail || res.statusText);
      dataPath.value = d.path;
      uploadState.textContent = `uploaded ${d.name} (${fmt.bytes(d.size)})`;
      schedule();
    } catch (e) { uploadState.textContent = "upload failed"; toast(`upload failed: ${e.message}`, true); }
  }
  fileInput.addEventListener("change", () => fileInput.files[0] && upload(fileInput.files[0]));
  drop.addEventListener("dragover", e => { e.preventDefault(); drop.classList.add("over"); });
  drop.addEventListener("dragleave", () => drop.classList.remove("over"));
  drop.addEventListener("drop", e => { e.preventDefault(); drop.classList.remove("over"); if (e.dataTransfer.files[0]) upload(e.dataTransfer.files[0]); });

  // Form -> config (only keys that were given).
  function buildConfig() {
    const v = name => { const el = form.elements[name]; return el ? String(el.value).trim() : ""; };
    const n = name => { const s = v(name); return s === "" ? undefined : Number(s); };
    const cfg = {};
    cfg.base_model = form.model_kind.value === "default" ? "default" : v("model_path");
    const ds = { path: v("data_path"), type: formatSel.value };
    fieldsBox.querySelectorAll("input").forEach(i => { if (i.value.trim()) ds[i.name] = i.value.trim(); });
    cfg.datasets = [ds];
    if (n("val_set_size")) cfg.val_set_size = n("val_set_size");
    const m = methodSel.value;
    if (m !== "sft") cfg.rl = m;
    if (v("adapter") !== "full") {
      cfg.adapter = v("adapter");
      if (v("adapter") === "qlora") cfg.load_in_4bit = true;
      for (const k of ["lora_r", "lora_alpha", "lora_dropout"]) if (n(k) !== undefined) cfg[k] = n(k);
      if (form.elements.lora_target_linear.checked) cfg.lora_target_linear = true;
    }
    if (n("rl_beta") !== undefined) cfg.rl_beta = n("rl_beta");
    if (m === "grpo") {
      cfg.grpo = { num_generations: n("grpo_num_generations"), reward_funcs: v("grpo_reward_funcs").split(",").map(s => s.trim()).filter(Boolean) };
    }
    for (const k of ["learning_rate", "num_epochs", "max_steps", "micro_batch_size", "gradient_accumulation_steps", "sequence_len", "warmup_ratio", "eval_steps", "save_steps", "seed"]) {
      if (n(k) !== undefined) cfg[k] = n(k);
    }
    cfg.lr_scheduler = v("lr_scheduler");
    const gc = v("gradient_checkpointing");
    if (gc !== "false") cfg.gradient_checkpointing = gc === "true" ? true : gc;
    if (form.elements.sample_packing.checked) cfg.sample_packing = true;
    if (form.elements.train_on_inputs.checked) cfg.train_on_inputs = true;
    return cfg;
  }
  const payload = () => ({ name: v0("name"), config: buildConfig(), advanced: form.elements.advanced.value });
  const v0 = name => String(form.elements[name].value || "").trim();

  let seq = 0, timer = null, lastYaml = "", lastOk = false;
  function schedule() { clearTimeout(timer); timer = setTimeout(validate, 300); }
  async function validate() {
    const my = ++seq;
    let d;
    try { d = await api("POST", "/api/config/check", payload()); } catch (e) { d = { ok: false, problems: [e.message], forbidden: [], yaml: "" }; }
    if (my !== seq) return;
    lastOk = d.ok;
    lastYaml = d.yaml || "";
    $("#yaml-out").textContent = lastYaml || "(nothing yet)";
    launchBtn.disabled = !d.ok;
    status.className = "notice " + (d.ok ? "ok" : "bad");
    if (d.ok) status.replaceChildren("✓ The config is valid and ready to launch.");
    else status.replaceChildren(h("b", {}, `${d.forbidden.length + d.problems.length} problem${d.forbidden.length + d.problems.length === 1 ? "" : "s"}`),
      h("ul", { id: "problems" }, [...d.forbidden.map(p => h("li", { class: "forbidden" }, "⛔ " + p)), ...d.problems.map(p => h("li", {}, p))]));
    dataPath.classList.toggle("invalid", !!dataPath.value.trim() && [...d.problems, ...d.forbidden].some(p => p.startsWith("datasets.0.path")));
    modelPath.classList.toggle("invalid", !!modelPath.value.trim() && [...d.problems, ...d.forbidden].some(p => p.startsWith("base_model")));
  }
  form.addEventListener("input", schedule);
  form.addEventListener("change", schedule);
  validate();
  onLeave(() => clearTimeout(timer));

  $("#yaml-dl").addEventListener("click", () => {
    const a = h("a", { href: URL.createObjectURL(new Blob([lastYaml], { type: "application/x-yaml" })), download: `${v0("name") || "run"}.yaml` });
    document.body.append(a); a.click(); a.remove();
  });

  async function showPreview() {
    const out = tabBodies.preview;
    const btn = $("#preview-btn");
    btn.disabled = true; btn.textContent = "Rendering…";
    try {
      const d = await api("POST", "/api/config/preview", { ...payload(), n: 3 });
      const body = [];
      if (!d.available) body.push(h("div", { class: "notice warn" }, "The data preview is not available in this build. ", h("small", {}, d.reason)));
      else if (!d.ok) body.push(h("div", { class: "notice bad" }, h("b", {}, "Cannot render the data"), h("ul", {}, d.problems.map(p => h("li", {}, p)))));
      else {
        body.push(h("div", { class: "legend" }, h("span", { class: "l-trained" }, "trained (has labels)"), h("span", { class: "l-masked" }, "masked (prompt, template)")));
        d.examples.forEach((ex, i) => body.push(h("div", { class: "example" },
          h("div", { class: "exhead" }, `example ${i + 1} · ${ex.tokens} tokens · ${ex.trained_tokens} trained`),
          ex.blocks.map(b => [b.title ? h("div", { class: "exhead" }, b.title) : null,
            b.segments.map(s => h("span", { class: s.trained ? "trained" : "masked" }, s.text))]))));
      }
      out.replaceChildren(...body, h("button", { type: "button", class: "btn", id: "preview-btn", style: { marginTop: "10px" } }, "Refresh"));
    } catch (e) {
      out.replaceChildren(h("div", { class: "notice bad" }, e.message), h("button", { type: "button", class: "btn", id: "preview-btn", style: { marginTop: "10px" } }, "Try again"));
    }
    $("#preview-btn").addEventListener("click", showPreview);
  }
  $("#preview-btn").addEventListener("click", showPreview);
  $("#plan-btn").addEventListener("click", async () => {
    const out = $("#plan-out");
    out.replaceChildren(h("div", { class: "muted" }, "Planning…"));
    try {
      const d = await api("POST", "/api/config/plan", { ...payload(), gpu_mem: $("#gpu-mem").value });
      if (!d.available) out.replaceChildren(h("div", { class: "notice warn" }, "The memory planner is not available in this build. ", h("small", {}, d.reason)));
      else if (!d.ok) out.replaceChildren(h("div", { class: "notice bad" }, h("ul", {}, d.problems.map(p => h("li", {}, p)))));
      else out.replaceChildren(h("div", { class: "notice " + (d.fits ? "ok" : "bad") }, d.fits ? "✓ Fits in memory" : "✗ Does not fit"),
        h("pre", { class: "box light", style: { marginTop: "8px" } }, d.report));
    } catch (e) { out.replaceChildren(h("div", { class: "notice bad" }, e.message)); }
  });

  launchBtn.addEventListener("click", async () => {
    if (!lastOk) return;
    launchBtn.disabled = true; launchBtn.textContent = "Launching…";
    try {
      const d = await api("POST", "/api/runs", payload());
      toast(`Started ${d.name}`);
      location.hash = `#/run/${d.id}`;
    } catch (e) {
      const probs = (e.data && e.data.problems) || [];
      toast(e.message + (probs.length ? ": " + probs.join("; ") : ""), true);
      launchBtn.disabled = false; launchBtn.textContent = "Launch training";
    }
  });
}

// ---------------------------------------------------------------------------- charts
const COLORS = ["#4f46e5", "#e8590c", "#0ca678", "#d6336c", "#1c7ed6"];
// Steps are whole numbers; time ticks fall on whole seconds.
const STEP_INCRS = [1, 2, 5, 10, 20, 25, 50, 100, 200, 250, 500, 1e3, 2e3, 2500, 5e3, 1e4, 2e4, 5e4, 1e5, 2e5, 5e5, 1e6];
const TIME_INCRS = [1, 2, 5, 10, 15, 30, 60, 120, 300, 600, 900, 1800, 3600, 7200, 21600, 43200, 86400];

function makeChart(title, series, opts = {}) {
  const plot = h("div", { class: "plot" }, h("div", { class: "nodata" }, opts.empty || "waiting for data…"));
  const val = h("span", { class: "val" });
  const card = h("div", { class: "card chart", dataset: { chart: opts.id || title, points: "0" } }, h("h3", {}, title, val), plot);
  let u = null;
  const data = [[], ...series.map(() => [])];
  function build() {
    const width = Math.max(200, plot.clientWidth || 300);
    u = new uPlot({
      width, height: opts.height || 200,
      scales: { x: { time: !!opts.time }, y: opts.yRange ? { range: opts.yRange } : {} },
      legend: { show: series.length > 1 },
      cursor: { points: { size: 6 } },
      axes: [
        opts.time
          ? { stroke: "#667085", grid: { stroke: "#eef0f3" }, ticks: { stroke: "#eef0f3" }, size: 34, incrs: TIME_INCRS, space: 80,
              values: (u, vals) => vals.map(v => new Date(v * 1000).toLocaleTimeString([], { hour: "2-digit", minute: "2-digit", second: "2-digit", hour12: false })) }
          : { stroke: "#667085", grid: { stroke: "#eef0f3" }, ticks: { stroke: "#eef0f3" }, size: 34, incrs: STEP_INCRS },
        { stroke: "#667085", grid: { stroke: "#eef0f3" }, ticks: { stroke: "#eef0f3" }, values: (u, vals) => vals.map(v => opts.fmtY ? opts.fmtY(v) : fmt.num(v, 3)),
          // Wide enough for the longest tick label (about 7 px a character at this size).
          size: (u, values) => 22 + 7.5 * Math.max(3, ...(values || []).map(v => String(v).length)) },
      ],
      series: [{ label: opts.xLabel || "step" }, ...series.map((s, i) => ({
        label: s.label, stroke: s.color || COLORS[i], width: 2, spanGaps: true,
        points: { show: s.points ?? false, size: 6, fill: s.color || COLORS[i] },
        value: (u, v) => v === null || v === undefined ? "—" : (opts.fmtY ? opts.fmtY(v) : fmt.num(v, 4)),
      }))],
    }, data, plot);
  }
  const ro = new ResizeObserver(() => { if (u) u.setSize({ width: Math.max(200, plot.clientWidth), height: opts.height || 200 }); });
  ro.observe(plot);
  onLeave(() => { ro.disconnect(); if (u) u.destroy(); });
  return {
    card,
    set(xs, cols) {
      data[0] = xs;
      cols.forEach((c, i) => { data[i + 1] = c; });
      const n = cols.reduce((acc, c) => acc + c.filter(v => v !== null && v !== undefined).length, 0);
      card.dataset.points = String(n);
      if (!n || xs.length < (opts.minPoints || 1)) return;
      const nd = plot.querySelector(".nodata");
      if (nd) nd.remove();
      if (!u) build(); else u.setData(data);
      const last = cols[0].findLast ? cols[0].findLast(v => v !== null && v !== undefined) : [...cols[0]].reverse().find(v => v !== null && v !== undefined);
      val.textContent = last === undefined ? "" : (opts.fmtY ? opts.fmtY(last) : fmt.num(last));
    },
    note(text) {
      const nd = plot.querySelector(".nodata") || plot.appendChild(h("div", { class: "nodata" }));
      nd.textContent = text;
    },
  };
}

// ---------------------------------------------------------------------------- run page
async function pageRun(view, id) {
  const run = await api("GET", `/api/runs/${id}`);
  document.title = `${run.name} · Tunery Studio`;
  const stopBtn = h("button", { class: "btn danger", id: "stop-btn", disabled: true }, "Stop");
  const resumeBtn = h("button", { class: "btn", id: "resume-btn", disabled: true }, "Resume");
  const chatLink = h("a", { class: "btn", href: `#/chat/${id}`, id: "chat-link" }, "Chat");
  const stateBadge = h("span", { id: "run-state" }, badge(run.state));
  const bar = h("div", { class: "progress" }, h("div", { style: { width: "0%" } }));
  const stats = h("div", { class: "stats", id: "run-stats" });

  const losses = makeChart("Loss", [{ label: "train" }, { label: "eval", color: "#e8590c", points: true }], { id: "loss" });
  const lr = makeChart("Learning rate", [{ label: "lr", color: "#0ca678" }], { id: "lr", fmtY: v => v.toExponential(2) });
  const gn = makeChart("Grad norm", [{ label: "grad norm", color: "#d6336c" }], { id: "grad_norm" });
  const tps = makeChart("Tokens / s", [{ label: "tokens/s", color: "#1c7ed6" }], { id: "tokens_per_s", fmtY: v => v >= 1000 ? Math.round(v).toLocaleString() : fmt.num(v, 1) });
  const sysChart = makeChart("Machine", [{ label: "CPU %" }, { label: "RAM %", color: "#0ca678" }], { id: "system", time: true, xLabel: "time", yRange: [0, 100], fmtY: v => `${Math.round(v)}%`, empty: "collecting…", minPoints: 2 });
  const sysTitle = sysChart.card.querySelector("h3");

  const logBox = h("pre", { class: "box", id: "log" }, "");
  const exportSource = h("select", { id: "export-source" });
  const feats = (await getInfo()).features;
  const quantSel = h("select", { id: "quant", style: { width: "auto" } }, ((await getInfo()).quants || ["f16"]).map(q => h("option", { value: q, selected: q === "q8_0" }, q)));
  const jobsBox = h("div", { class: "joblist", id: "jobs" });
  const filesBox = h("ul", { class: "files", id: "files" });

  view.append(
    h("div", { class: "pagehead" },
      h("div", { class: "grow" }, h("div", { class: "meta" }, h("a", { href: "#/runs" }, "← Runs")),
        h("div", { class: "row" }, h("h1", {}, run.name), stateBadge),
        h("div", { class: "meta" }, [run.method, run.model, run.dataset].filter(Boolean).join(" · "), ` · ${run.dir}`)),
      h("div", { class: "row" }, stopBtn, resumeBtn, chatLink,
        h("a", { class: "btn", href: `/api/runs/${id}/config.yaml`, download: "" }, "Config"))),
    h("div", { class: "card statusbar" }, bar, stats),
    h("div", { class: "charts" }, losses.card, lr.card, gn.card, tps.card),
    h("div", { class: "two-col" }, sysChart.card,
      h("div", { class: "card" }, h("h2", {}, "Log", h("span", { class: "right muted" }, h("small", {}, "train.log"))), logBox)),
    h("div", { class: "card", style: { marginTop: "16px" }, id: "export-card" },
      h("h2", {}, "Export"),
      h("div", { class: "row" },
        h("label", { class: "field", style: { minWidth: "200px" } }, "Weights", exportSource),
        h("label", { class: "field" }, "GGUF type", quantSel)),
      h("div", { class: "row", style: { marginTop: "12px" } },
        h("button", { class: "btn", dataset: { export: "merge" } }, "Merge to HF folder"),
        h("button", { class: "btn", dataset: { export: "gguf" } }, "Export GGUF"),
        h("button", { class: "btn", dataset: { export: "ollama" } }, "Export for Ollama")),
      jobsBox, filesBox),
    h("details", { class: "card adv", style: { marginTop: "16px" } }, h("summary", {}, "Config"),
      h("pre", { class: "box light" }, run.config_yaml || "(no config.yaml)")));

  // Metrics, merged by step.
  const M = { steps: [], loss: [], eval: [], lr: [], gn: [], tps: [] };
  function addRows(rows) {
    for (const r of rows) {
      if (typeof r.step !== "number") continue;
      let i = M.steps.length - 1;
      if (i < 0 || M.steps[i] !== r.step) {
        if (i >= 0 && r.step < M.steps[i]) continue;
        M.steps.push(r.step); for (const k of ["loss", "eval", "lr", "gn", "tps"]) M[k].push(null);
        i++;
      }
      if (typeof r.loss === "number") M.loss[i] = r.loss;
      if (typeof r.eval_loss === "number") M.eval[i] = r.eval_loss;
      if (typeof r.lr === "number") M.lr[i] = r.lr;
      if (typeof r.grad_norm === "number") M.gn[i] = r.grad_norm;
      if (typeof r.tokens_per_s === "number") M.tps[i] = r.tokens_per_s;
    }
    draw();
  }
  let pending = false;
  function draw() {
    if (pending) return;
    pending = true;
    requestAnimationFrame(() => {
      pending = false;
      losses.set(M.steps, [M.loss, M.eval]);
      lr.set(M.steps, [M.lr]);
      gn.set(M.steps, [M.gn]);
      tps.set(M.steps, [M.tps]);
    });
  }
  const S = { t: [], a: [], b: [] };
  let sysMode = null;
  function addSystem(s) {
    const g = s.gpus && s.gpus.length ? s.gpus : null;
    const mode = g ? "gpu" : "cpu";
    if (mode !== sysMode) {
      sysMode = mode; S.t = []; S.a = []; S.b = [];
      sysTitle.firstChild.textContent = g ? `GPU · ${g[0].name}${g.length > 1 ? ` (+${g.length - 1})` : ""}` : `CPU (${s.cpu_count} cores) and RAM`;
    }
    let a, b;
    if (g) {
      const util = g.filter(x => x.util !== null);
      a = util.length ? util.reduce((acc, x) => acc + x.util, 0) / util.length : null;
      b = 100 * g.reduce((acc, x) => acc + x.mem_used, 0) / g.reduce((acc, x) => acc + x.mem_total, 0);
    } else {
      a = s.cpu_percent;
      b = s.ram_total ? 100 * s.ram_used / s.ram_total : null;
    }
    S.t.push(s.t); S.a.push(a); S.b.push(b);
    if (S.t.length > 300) { S.t.shift(); S.a.shift(); S.b.shift(); }
    sysChart.set(S.t, [S.a, S.b]);
    const labels = sysChart.card.querySelectorAll(".u-legend .u-series:not(:first-child) .u-label");
    if (labels.length === 2) { labels[0].textContent = g ? "GPU util %" : "CPU %"; labels[1].textContent = g ? "GPU mem %" : "RAM %"; }
    const memText = g ? `${fmt.bytes(g.reduce((acc, x) => acc + x.mem_used, 0))} / ${fmt.bytes(g.reduce((acc, x) => acc + x.mem_total, 0))}`
      : s.ram_total ? `${fmt.bytes(s.ram_used)} / ${fmt.bytes(s.ram_total)}` : "";
    sysChart.card.querySelector(".val").textContent = memText;
  }

  function renderStatus(s) {
    stateBadge.replaceChildren(badge(s.state));
    const pct = s.progress !== null && s.progress !== undefined ? Math.min(100, 100 * s.progress) : 0;
    bar.firstChild.style.width = `${pct}%`;
    bar.classList.toggle("indeterminate", s.state === "starting");
    const items = [
      ["Step", s.total_steps ? `${s.step ?? 0} / ${s.total_steps}` : "—"],
      ["Progress", s.progress !== null && s.progress !== undefined ? `${Math.round(pct)}%` : "—"],
      ["ETA", s.state === "running" ? fmt.dur(s.eta_s) : "—"],
      ["Elapsed", fmt.dur(s.duration_s)],
      ["Last loss", fmt.num(s.last_loss)],
    ];
    stats.replaceChildren(...items.map(([k, v]) => h("span", {}, `${k} `, h("b", { dataset: { stat: k.toLowerCase().replace(" ", "_") } }, v))));
    if (s.state === "starting") stats.append(h("span", {}, "loading the model and the data…"));
    stopBtn.disabled = !s.can_stop;
    stopBtn.textContent = s.stop_requested ? "Force stop" : "Stop";
    stopBtn.title = s.stop_requested ? "stop now, without waiting for the step and its checkpoint" : "finish the current step, save a checkpoint and stop";
    resumeBtn.disabled = !s.can_resume;
    resumeBtn.title = s.checkpoints.length ? `continue from checkpoint step ${s.checkpoints[s.checkpoints.length - 1].step}` : "no checkpoint yet";
    // Export sources: final weights and checkpoints.
    const opts = [];
    if (s.final) opts.push(["final", `final weights (${s.final}/)`]);
    for (const c of [...s.checkpoints].reverse()) opts.push([c.path, `checkpoint step ${c.step}`]);
    const key = JSON.stringify(opts);
    if (exportSource.dataset.key !== key) {
      const keep = exportSource.value;
      exportSource.dataset.key = key;
      exportSource.replaceChildren(...(opts.length ? opts : [["", "nothing to export yet"]]).map(([v, l]) => h("option", { value: v, selected: v === keep }, l)));
    }
    const live = ["starting", "running", "stopping"].includes(s.state);
    document.querySelectorAll("[data-export]").forEach(b => {
      const have = b.dataset.export === "merge" ? feats.merge : feats.export;
      b.disabled = !have || !opts.length || (live && exportSource.value === "final");
      b.title = have ? "" : "not available in this build";
    });
  }

  function renderJobs(d) {
    jobsBox.replaceChildren(...d.jobs.slice(0, 6).map(j => {
      const running = j.state === "running";
      const p = h("div", { class: "progress" + (running && j.percent === null ? " indeterminate" : "") }, h("div", { style: { width: `${j.percent ?? (running ? 0 : 100)}%` } }));
      return h("div", { class: "job", dataset: { job: j.id, state: j.state } },
        h("div", { class: "row" }, h("b", {}, j.label), badge(j.state), h("span", { class: "spacer" }),
          j.output ? h("a", { class: "btn small", href: `/api/runs/${id}/download?path=${encodeURIComponent(j.output)}`, download: "", dataset: { download: j.output } }, "Download") : null),
        running || j.state !== "done" ? p : null,
        j.kind === "ollama" && j.output ? h("div", { class: "muted" }, "Then, in that folder: ", h("code", {}, `ollama create ${slug(run.name)} -f Modelfile`)) : null,
        j.log && j.log.length && j.state !== "done" ? h("div", { class: "log" }, j.log.slice(-3).join("\n")) : null);
    }));
    filesBox.replaceChildren(...(d.exports || []).map(f => h("li", {}, h("span", { class: "name" }, f.name + (f.folder ? "/" : "")),
      h("span", { class: "muted" }, fmt.bytes(f.size)),
      h("a", { href: `/api/runs/${id}/download?path=${encodeURIComponent(f.path)}`, download: "" }, f.folder ? "download .zip" : "download"))));
  }

  document.querySelectorAll("[data-export]").forEach(b => b.addEventListener("click", async () => {
    b.disabled = true;
    try {
      await api("POST", `/api/runs/${id}/export`, { kind: b.dataset.export, quant: quantSel.value, source: exportSource.value });
      toast(`${b.textContent} started`);
      connect();
    } catch (e) { toast(e.message, true); }
    b.disabled = false;
  }));
  stopBtn.addEventListener("click", async () => {
    try { const d = await api("POST", `/api/runs/${id}/stop`); toast(d.force ? "Stopping now" : "Stopping after this step (a checkpoint is saved)"); }
    catch (e) { toast(e.message, true); }
  });
  resumeBtn.addEventListener("click", async () => {
    resumeBtn.disabled = true;
    try { await api("POST", `/api/runs/${id}/resume`); toast("Resuming from the last checkpoint"); connect(); }
    catch (e) { toast(e.message, true); resumeBtn.disabled = false; }
  });

  // Live updates: one event stream; it ends when nothing runs, and reopens on Resume or an export.
  let es = null;
  function connect() {
    if (es) es.close();
    M.steps.length = 0; for (const k of ["loss", "eval", "lr", "gn", "tps"]) M[k].length = 0;
    es = new EventSource(`/api/runs/${id}/events`);
    es.addEventListener("reset", () => { M.steps.length = 0; for (const k of ["loss", "eval", "lr", "gn", "tps"]) M[k].length = 0; draw(); });
    es.addEventListener("metrics", e => addRows(JSON.parse(e.data).rows));
    es.addEventListener("status", e => renderStatus(JSON.parse(e.data)));
    es.addEventListener("log", e => {
      const lines = JSON.parse(e.data).lines;
      const atEnd = logBox.scrollHeight - logBox.scrollTop - logBox.clientHeight < 30;
      logBox.textContent = lines.join("\n") || "(empty)";
      if (atEnd) logBox.scrollTop = logBox.scrollHeight;
    });
    es.addEventListener("jobs", e => renderJobs(JSON.parse(e.data)));
    es.addEventListener("system", e => addSystem(JSON.parse(e.data)));
    es.addEventListener("end", () => {
      es.close(); es = null;
      if (S.t.length < 2) sysChart.note("shown while the run trains or exports");
    });
  }
  connect();
  onLeave(() => { if (es) es.close(); });
}

// ---------------------------------------------------------------------------- chat
async function pageChat(view, runId, query) {
  document.title = "Chat · Tunery Studio";
  const params = new URLSearchParams(query || "");
  const t = await api("GET", "/api/chat/targets");
  const runSel = h("select", { id: "chat-run" });
  const targetSel = h("select", { id: "chat-target" });
  const sys = h("textarea", { id: "chat-system", rows: 3, placeholder: "optional system prompt", style: { fontFamily: "inherit" } });
  const settings = {
    temperature: num("temperature", 0.7, { min: 0, max: 5, step: 0.05 }),
    top_p: num("top_p", 0.95, { min: 0.01, max: 1, step: 0.01 }),
    top_k: num("top_k", 0, { min: 0, step: 1 }),
    max_new_tokens: num("max_new_tokens", 256, { min: 1, max: 4096, step: 1 }),
    repetition_penalty: num("repetition_penalty", 1.1, { min: 0.5, max: 3, step: 0.05 }),
  };
  const messagesBox = h("div", { class: "messages", id: "messages" });
  const input = h("textarea", { id: "chat-input", rows: 1, placeholder: "Message… (Enter sends)", title: "Enter sends, Shift+Enter starts a new line" });
  const send = h("button", { class: "btn primary", id: "chat-send" }, "Send");
  const stopGen = h("button", { class: "btn hidden", id: "chat-stop" }, "Stop");
  let history = [];
  let controller = null;

  if (!t.runs.length) {
    view.append(h("div", { class: "pagehead" }, h("h1", {}, "Chat")),
      h("div", { class: "card empty" }, "No run has weights to chat with yet: a run can be chatted with once it has finished or saved a checkpoint.",
        h("div", {}, h("a", { class: "btn primary", href: "#/runs" }, "See runs"))));
    return;
  }
  runSel.append(...t.runs.map(r => h("option", { value: r.id, selected: String(r.id) === String(runId) }, `${r.name} (${r.state})`)));
  function fillTargets() {
    const r = t.runs.find(x => String(x.id) === runSel.value) || t.runs[0];
    targetSel.replaceChildren(...r.options.map(o => h("option", { value: o.target, selected: o.target === params.get("target") }, o.label)));
  }
  runSel.addEventListener("change", () => { fillTargets(); reset(); });
  targetSel.addEventListener("change", reset);
  fillTargets();

  function reset() {
    if (controller) controller.abort();
    history = [];
    messagesBox.replaceChildren(h("div", { class: "empty", id: "chat-empty" }, "Say something to the model. Replies stream as they are generated."));
  }
  reset();

  view.append(
    h("div", { class: "pagehead" }, h("div", { class: "grow" }, h("h1", {}, "Chat"), h("div", { class: "meta" }, "Talk to a finished run or any of its checkpoints.")),
      h("button", { class: "btn", onclick: reset, id: "chat-new" }, "New conversation")),
    ...(t.available ? [] : [h("div", { class: "notice warn", style: { marginBottom: "16px" } }, "Chat is not available in this build (tunery.inference is missing).")]),
    h("div", { class: "chat" },
      h("div", { class: "card stack" },
        field("Run", runSel), field("Weights", targetSel),
        h("details", { class: "adv", open: window.innerWidth > 1000 }, h("summary", {}, "Generation settings"),
          h("div", { class: "grid", style: { gridTemplateColumns: "1fr 1fr" } },
            field("Temperature", settings.temperature), field("Top-p", settings.top_p), field("Top-k", settings.top_k),
            field("Max new tokens", settings.max_new_tokens), field("Repeat penalty", settings.repetition_penalty)),
          h("div", { style: { marginTop: "12px" } }, field("System prompt", sys)))),
      h("div", { class: "card chatpane" }, messagesBox, h("div", { class: "composer" }, input, stopGen, send))));

  function addMsg(role, text) {
    const empty = $("#chat-empty");
    if (empty) empty.remove();
    const el = h("div", { class: `msg ${role}` }, text);
    messagesBox.append(el);
    messagesBox.scrollTop = messagesBox.scrollHeight;
    return el;
  }

  async function submit() {
    const text = input.value.trim();
    if (!text || controller) return;
    input.value = "";
    history.push({ role: "user", content: text });
    addMsg("user", text);
    const out = addMsg("assistant", "");
    out.classList.add("streaming");
    const info = h("span", { class: "info" }, "…");
    out.append(info);
    const body = h("span", { class: "text" });
    out.insertBefore(body, info);
    const msgs = sys.value.trim() ? [{ role: "system", content: sys.value.trim() }, ...history] : [...history];
    const s = Object.fromEntries(Object.entries(settings).map(([k, el]) => [k, Number(el.value)]));
    controller = new AbortController();
    send.classList.add("hidden"); stopGen.classList.remove("hidden");
    let reply = "";
    try {
      const res = await fetch("/api/chat", {
        method: "POST", signal: controller.signal,
        headers: { "Content-Type": "application/json", "X-Tunery": "1" },
        body: JSON.stringify({ run_id: Number(runSel.value), target: targetSel.value, messages: msgs, settings: s }),
      });
      if (!res.ok) { const d = await res.json().catch(() => ({})); throw new Error(d.detail || res.statusText); }
      const reader = res.body.getReader();
      const dec = new TextDecoder();
      let buf = "";
      for (;;) {
        const { value, done } = await reader.read();
        if (done) break;
        buf += dec.decode(value, { stream: true });
        let k;
        while ((k = buf.indexOf("\n\n")) >= 0) {
          const chunk = buf.slice(0, k); buf = buf.slice(k + 2);
          let ev = "message", data = "";
          for (const line of chunk.split("\n")) {
            if (line.startsWith("event: ")) ev = line.slice(7);
            else if (line.startsWith("data: ")) data += line.slice(6);
          }
          if (!data) continue;
          const d = JSON.parse(data);
          if (ev === "token") { reply += d.text; body.textContent = reply; messagesBox.scrollTop = messagesBox.scrollHeight; }
          else if (ev === "status") info.textContent = d.text;
          else if (ev === "done") info.textContent = `${d.tokens} tokens · ${d.seconds}s${d.per_s ? ` · ${d.per_s} tokens/s` : ""}`;
          else if (ev === "error") throw new Error(d.text);
        }
      }
      history.push({ role: "assistant", content: reply });
    } catch (e) {
      if (e.name === "AbortError") { info.textContent = "stopped"; if (reply) history.push({ role: "assistant", content: reply }); }
      else { out.remove(); addMsg("error", e.message); history.pop(); }
    } finally {
      out.classList.remove("streaming");
      controller = null;
      send.classList.remove("hidden"); stopGen.classList.add("hidden");
    }
  }
  send.addEventListener("click", submit);
  stopGen.addEventListener("click", () => controller && controller.abort());
  input.addEventListener("keydown", e => { if (e.key === "Enter" && !e.shiftKey) { e.preventDefault(); submit(); } });
  onLeave(() => controller && controller.abort());
}
