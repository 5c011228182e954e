// slime-router trajectory inspector: plain JS, no build step, nothing fetched but this router's own JSON routes.
// Data: GET /inspector/sessions (the list), GET /sessions/{sid} (tokens, loss mask, logprobs, weight versions),
// POST /inspector/tokens (each token's text), POST /retrieve_from_text and /retrieve_from_messages (pasted),
// GET /radix_tree/stats (the cache's audit counters). With --api-key the key is kept in sessionStorage and sent as
// "Authorization: Bearer <key>".
"use strict";
(function () {
  const CHUNK = 2048;           // tokens appended per frame: a 32k-token trajectory never blocks the page long
  const KEY = "slimeRouterInspectorKey";
  const PALETTE = ["#3f6ad8", "#d8703f", "#2e9e6a", "#9c3fd8", "#c23a6b", "#5f7d12", "#1d8fa8", "#8a6a12"];
  const $ = (id) => document.getElementById(id);
  const state = { sessions: [], pasted: [], selected: null, renderId: 0, view: null };

  // logprob heat classes h0 (0) .. h10 (<= -5), built once
  const style = document.createElement("style");
  let css = "";
  for (let k = 0; k <= 10; k++) css += `.tok.m1.h${k}{background:hsl(${130 - 13 * k} 65% ${78 - k * 0.6}%)}`;
  PALETTE.forEach((c, k) => { css += `.tok.v${k}{border-bottom-color:${c}}#bands .band.v${k}{background:${c}}`; });
  style.textContent = css;
  document.head.appendChild(style);

  // --- the API -----------------------------------------------------------------------------------------
  const keyInput = $("key");
  keyInput.value = sessionStorage.getItem(KEY) || "";
  keyInput.addEventListener("change", () => {
    sessionStorage.setItem(KEY, keyInput.value.trim());
    refresh();
  });

  async function api(path, body) {
    const headers = {};
    const key = sessionStorage.getItem(KEY);
    if (key) headers["Authorization"] = "Bearer " + key;
    const init = { headers, method: body === undefined ? "GET" : "POST" };
    if (body !== undefined) {
      headers["Content-Type"] = "application/json";
      init.body = JSON.stringify(body);
    }
    const r = await fetch(path, init);
    const text = await r.text();
    let data = null;
    try { data = text ? JSON.parse(text) : null; } catch (e) { data = null; }
    if (!r.ok) {
      const msg = (data && data.error && data.error.message) || text || r.statusText;
      const err = new Error(r.status === 401 ? "This router needs its API key: enter it above. (" + msg + ")" : `${r.status}: ${msg}`);
      err.status = r.status;
      throw err;
    }
    return data;
  }

  function say(msg) { $("message").textContent = msg || ""; }

  // --- audit counters ----------------------------------------------------------------------------------
  async function loadAudit() {
    const box = $("audit");
    let stats;
    try { stats = await api("/radix_tree/stats"); } catch (e) { box.textContent = ""; return; }
    const items = [["records", stats.records], ["cache hit rate", pct(stats.hit_rate)],
      ["token hit rate", pct(stats.token_hit_rate)], ["evictions", stats.evictions],
      ["evicted unretrieved", stats.evicted_unretrieved], ["retrievals", stats.retrievals]];
    for (const [k, v] of Object.entries(stats.audit || {})) items.push([k.replace(/_/g, " "), v]);
    const frag = document.createDocumentFragment();
    const title = document.createElement("span");
    title.innerHTML = "<b>cache audit</b>";
    frag.appendChild(title);
    for (const [k, v] of items) {
      const s = document.createElement("span");
      s.className = "counter";
      s.textContent = k + ": ";
      const b = document.createElement("b");
      b.textContent = v === undefined || v === null ? "–" : String(v);
      s.appendChild(b);
      frag.appendChild(s);
    }
    box.replaceChildren(frag);
  }
  const pct = (x) => (typeof x === "number" ? (100 * x).toFixed(1) + "%" : "–");

  // --- the list ----------------------------------------------------------------------------------------
  async function refresh() {
    say("");
    loadAudit();
    try {
      const data = await api("/inspector/sessions");
      state.sessions = data.sessions || [];
      $("list-stats").textContent = data.stats ? `${data.stats.sessions} open session(s), ${data.stats.tokens} tokens held` +
        (data.shown < data.stats.sessions ? ` (the ${data.shown} most recent listed)` : "") : "";
    } catch (e) {
      state.sessions = [];
      say(e.message);
    }
    renderList();
  }

  function groupsOf(s) {
    const out = [];
    const m = s.metadata || {};
    for (const k of ["group", "group_id", "groupId", "group_index"]) if (m[k] !== undefined) out.push(String(m[k]));
    for (const t of s.trajectories || []) for (const g of t.groups || []) out.push(g);
    return out;
  }

  function filters() {
    return { sid: $("f-session").value.trim(), group: $("f-group").value.trim(), version: $("f-version").value.trim(),
      fresh: $("f-fresh").checked, rewrite: $("f-rewrite").checked };
  }

  function trajMatches(t, f) {
    if (f.version && !(t.weight_versions || []).some((v) => v.includes(f.version))) return false;
    if (f.rewrite && t.reason !== "rewrite") return false;
    return true;
  }

  function renderList() {
    const f = filters();
    const frag = document.createDocumentFragment();
    let shown = 0;
    for (const s of state.sessions) {
      if (f.sid && !s.session_id.includes(f.sid)) continue;
      if (f.group && !groupsOf(s).some((g) => g.includes(f.group))) continue;
      if (f.fresh && !s.gaps) continue;  // a session's tokens are exact; its gaps are the turns that are not
      const trajs = (s.trajectories || []).filter((t) => trajMatches(t, f));
      if ((f.version || f.rewrite) && !trajs.length) continue;
      const li = document.createElement("li");
      li.className = "session";
      li.dataset.sid = s.session_id;
      const head = document.createElement("div");
      head.className = "sid";
      head.textContent = s.session_id;
      const meta = document.createElement("div");
      meta.className = "meta";
      const md = Object.keys(s.metadata || {}).length ? " · " + JSON.stringify(s.metadata) : "";
      meta.textContent = `${s.requests} request(s) · ${s.segments} trajectory(ies) · ${s.tokens} tokens` +
        (s.gaps ? ` · ${s.gaps} gap(s)` : "") + md;
      li.append(head, meta);
      for (const t of trajs) {
        const b = document.createElement("button");
        b.type = "button";
        b.className = "traj";
        b.dataset.sid = s.session_id;
        b.dataset.index = t.index;
        if (state.selected && state.selected.sid === s.session_id && state.selected.index === t.index) b.classList.add("selected");
        const why = t.reason === "new" ? "new" : `${t.reason} of #${t.parent} at ${t.diverges_at}`;
        b.textContent = `#${t.index} ${why} · ${t.token_length} tok (${t.generated_tokens} generated) · ` +
          `v ${(t.weight_versions || []).join(", ")}`;
        b.addEventListener("click", () => openSession(s.session_id, t.index));
        li.appendChild(b);
      }
      frag.appendChild(li);
      shown++;
    }
    for (const p of state.pasted) {
      if (f.sid || f.group || f.version) continue;
      if (f.fresh && !p.result.fresh_tokens) continue;
      if (f.rewrite && !(p.result.history_rewritten || p.result.evicted)) continue;
      const li = document.createElement("li");
      li.className = "session pasted";
      const b = document.createElement("button");
      b.type = "button";
      b.className = "traj";
      b.textContent = `pasted ${p.kind} #${p.n} · ${p.result.token_length} tok · ${p.result.fresh_tokens} fresh`;
      b.addEventListener("click", () => showRetrieved(p));
      li.appendChild(b);
      frag.appendChild(li);
      shown++;
    }
    if (!shown) {
      const li = document.createElement("li");
      li.className = "session muted";
      li.textContent = state.sessions.length || state.pasted.length ? "nothing matches the filters" :
        "no open session (send requests with X-Session-ID, or under /sessions/<sid>/...)";
      frag.appendChild(li);
    }
    $("list").replaceChildren(frag);
  }

  for (const id of ["f-session", "f-group", "f-version"]) $(id).addEventListener("input", renderList);
  for (const id of ["f-fresh", "f-rewrite"]) $(id).addEventListener("change", renderList);
  $("refresh").addEventListener("click", refresh);

  // --- opening a trajectory ----------------------------------------------------------------------------
  async function openSession(sid, index) {
    const t0 = performance.now();
    state.selected = { sid, index };
    history.replaceState(null, "", "#session=" + encodeURIComponent(sid) + "&t=" + index);
    renderList();
    say("");
    try {
      const s = await api("/sessions/" + encodeURIComponent(sid));
      const t = s.trajectories.find((x) => x.index === index);
      if (!t) throw new Error(`session ${sid} has no trajectory #${index}`);
      const reasons = [];
      reasons.push(t.reason === "new" ? { cls: "new", text: "new: a trajectory of its own from token 0" } :
        { cls: t.reason, text: `${t.reason}: shares its first ${t.diverges_at} tokens with trajectory #${t.parent}` +
          (t.reason === "rewrite" ? " (history changed: the prompt departs from it there)" : " (a sibling sample)") });
      for (const g of s.gaps || []) reasons.push({ cls: "warn", text: `gap (${g.reason}): ${g.message}` });
      const ends = [];
      let offset = 0;
      const turns = t.turns.map((u, k) => {
        const end = u.prompt_tokens + u.output_tokens;
        ends.push(end);
        const out = { k, start: offset, prompt_end: u.prompt_tokens, end, group: u.group, request_id: u.request_id };
        offset = end;
        return out;
      });
      const breaks = new Map();
      for (const u of turns.slice(0, -1)) addBreak(breaks, u.end, "turn", `turn ${u.k + 1} starts`);
      if (t.diverges_at !== null && t.diverges_at !== undefined && t.reason !== "new") {
        addBreak(breaks, t.diverges_at, "diverge", `${t.reason} of #${t.parent} diverges here (token ${t.diverges_at})`);
      }
      await show({
        title: `session ${sid} · trajectory #${t.index} (${t.reason})`,
        tokens: t.tokens, mask: t.loss_mask, logp: t.rollout_logp, versions: t.weight_versions,
        freshFrom: t.tokens.length, turns, breaks, reasons,
        counts: { tokens: t.token_length, "loss_mask 1": t.generated_tokens, exact: t.token_length, fresh: 0,
          turns: t.turns.length, "weight versions": new Set(t.weight_versions).size },
      }, t0);
    } catch (e) {
      say(e.message);
    }
  }

  function addBreak(map, pos, kind, label) {
    const list = map.get(pos) || [];
    list.push({ kind, label });
    map.set(pos, list);
  }

  async function showRetrieved(p) {
    const t0 = performance.now();
    state.selected = null;
    renderList();
    const r = p.result;
    const reasons = [];
    const freshFrom = r.token_length - r.fresh_tokens;
    const breaks = new Map();
    if (r.fresh_tokens) addBreak(breaks, freshFrom, "diverge", `not recorded: ${r.fresh_tokens} fresh tokens from here (loss_mask 0)`);
    if (r.evicted) reasons.push({ cls: "warn", text: `evicted at char ${r.evicted_at_char}: ${r.warning || ""}` });
    else if (r.warning) reasons.push({ cls: "warn", text: r.warning });
    for (const w of r.rewritten_turns || []) {
      reasons.push({ cls: "rewrite", text: `message ${w.message_index !== undefined ? w.message_index : w.index}: rewritten (${w.cause})` +
        (w.message ? ": " + w.message : "") });
    }
    if (r.unverified_turns && r.unverified_turns.length) reasons.push({ cls: "warn", text: `unverified assistant message(s): ${r.unverified_turns.join(", ")}` });
    if (!reasons.length) reasons.push({ cls: "new", text: r.fresh_tokens ? "partly recorded" : "every token served as recorded" });
    await show({
      title: `pasted ${p.kind} #${p.n}` + (r.history_mode ? ` (history_mode ${r.history_mode})` : ""),
      tokens: r.tokens, mask: r.loss_mask, logp: r.rollout_logp, versions: r.weight_versions,
      freshFrom, turns: null, breaks, reasons,
      counts: { tokens: r.token_length, "loss_mask 1": r.loss_mask.filter((x) => x === 1).length,
        exact: r.exact_tokens, fresh: r.fresh_tokens, "recorded chars": r.recorded_chars },
    }, t0);
  }

  let pasteCount = 0;
  $("paste-go").addEventListener("click", async () => {
    const raw = $("paste").value;
    const kind = document.querySelector("input[name=paste-kind]:checked").value;
    say("");
    try {
      let result;
      if (kind === "text") {
        result = await api("/retrieve_from_text", { text: raw });
      } else {
        let parsed;
        try { parsed = JSON.parse(raw); } catch (e) { throw new Error("Not JSON: " + e.message); }
        const body = Array.isArray(parsed) ? { messages: parsed } : parsed;
        result = await api("/retrieve_from_messages", body);
      }
      const p = { kind, n: ++pasteCount, result };
      state.pasted.unshift(p);
      renderList();
      await showRetrieved(p);
    } catch (e) {
      say(e.message);
    }
  });

  // --- rendering ---------------------------------------------------------------------------------------
  async function show(v, t0) {
    const id = ++state.renderId;
    const texts = v.tokens.length ? (await api("/inspector/tokens", { ids: v.tokens })).texts : [];
    if (id !== state.renderId) return;
    const fetched = performance.now();
    v.texts = texts;
    const versionIndex = new Map();
    for (const x of v.versions) if (!versionIndex.has(x)) versionIndex.set(x, versionIndex.size);
    v.versionIndex = versionIndex;
    state.view = v;
    $("empty").hidden = true;
    $("traj").hidden = false;
    $("traj-title").textContent = v.title;
    const counts = document.createDocumentFragment();
    for (const [k, val] of Object.entries(v.counts)) {
      const d = document.createElement("div");
      const dt = document.createElement("dt");
      dt.textContent = k;
      const dd = document.createElement("dd");
      dd.id = "count-" + k.replace(/[^a-z0-9]+/gi, "-");
      dd.textContent = val === undefined || val === null ? "–" : String(val);
      d.append(dt, dd);
      counts.appendChild(d);
    }
    $("counts").replaceChildren(counts);
    const reasons = document.createDocumentFragment();
    for (const r of v.reasons) {
      const s = document.createElement("span");
      s.className = "reason " + r.cls;
      s.textContent = r.text;
      reasons.appendChild(s);
    }
    $("reasons").replaceChildren(reasons);
    renderBands(v);
    const box = $("tokens");
    box.replaceChildren();
    box.dataset.state = "rendering";
    box.scrollTop = 0;
    const n = v.tokens.length;
    let firstChunk = null;
    await new Promise((resolve) => {
      let i = 0;
      const step = () => {
        if (id !== state.renderId) return resolve();
        // one block per chunk, ended at a line break when there is one (the text flows on unchanged): the browser
        // lays out each chunk on its own and skips the ones off screen (content-visibility)
        const chunk = document.createElement("div");
        chunk.className = "chunk";
        const frag = document.createDocumentFragment();
        const start = i;
        for (; i < n; i++) {
          const k = i - start;
          if (k >= 2 * CHUNK || (k >= CHUNK && v.texts[i - 1].endsWith("\n"))) break;
          appendToken(frag, v, i);
        }
        if (i >= n && v.breaks.has(n)) appendBreaks(frag, v.breaks.get(n));
        chunk.appendChild(frag);
        box.appendChild(chunk);
        if (firstChunk === null) firstChunk = performance.now();
        if (i < n) setTimeout(step, 0); else resolve();
      };
      step();
    });
    void box.scrollHeight;  // the layout of what is on screen is part of the render time
    if (id !== state.renderId) return;
    box.dataset.state = "done";
    const done = performance.now();
    window.inspectorTiming = { tokens: n, fetch_ms: fetched - t0, render_ms: done - fetched, first_chunk_ms: firstChunk - fetched, chunk: CHUNK, total_ms: done - t0, at_ms: done };
  }

  function appendBreaks(frag, list) {
    for (const b of list) {
      const s = document.createElement("span");
      s.className = "brk " + b.kind;
      s.title = b.label;
      s.dataset.label = b.label;
      s.textContent = b.kind === "turn" ? "│" : "⑂";
      frag.appendChild(s);
    }
  }

  function appendToken(frag, v, i) {
    const br = v.breaks.get(i);
    if (br) appendBreaks(frag, br);
    const s = document.createElement("span");
    const m = v.mask[i];
    let cls = "tok m" + m + " v" + (v.versionIndex.get(v.versions[i]) % PALETTE.length);
    if (m === 1) cls += " h" + Math.min(10, Math.max(0, Math.round(-v.logp[i] * 2)));
    else if (i >= v.freshFrom) cls += " fresh";
    s.className = cls;
    s.dataset.i = i;
    const t = v.texts[i];
    s.textContent = t === "" ? "∅" : t.includes("\n") ? t.replace(/\n/g, "↵\n") : t;
    frag.appendChild(s);
  }

  function renderBands(v) {
    const frag = document.createDocumentFragment();
    const n = v.versions.length;
    let start = 0;
    for (let i = 1; i <= n; i++) {
      if (i < n && v.versions[i] === v.versions[start]) continue;
      const b = document.createElement("div");
      const ver = v.versions[start];
      b.className = "band v" + (v.versionIndex.get(ver) % PALETTE.length);
      b.dataset.version = ver === null ? "" : ver;
      b.dataset.start = start;
      b.dataset.count = i - start;
      b.style.flex = `${i - start} 0 0`;
      const label = ver === null || ver === undefined ? "no version (fresh)" : "v " + ver;
      b.title = `${label}: tokens ${start}..${i - 1}`;
      b.textContent = label;
      frag.appendChild(b);
      start = i;
    }
    $("bands").replaceChildren(frag);
  }

  // --- the tooltip -------------------------------------------------------------------------------------
  const tip = $("tip");
  let lit = null;
  $("tokens").addEventListener("mouseover", (e) => {
    const el = e.target.closest ? e.target.closest(".tok") : null;
    const v = state.view;
    if (!el || !v) return;
    if (lit) lit.classList.remove("hl");
    lit = el;
    el.classList.add("hl");
    const i = +el.dataset.i;
    let turn = "–";
    if (v.turns) {
      const u = v.turns.find((x) => i < x.end);
      if (u) turn = `${u.k + 1} (${i < u.prompt_end ? "prompt" : "output"}${u.group ? ", group " + u.group : ""})`;
    }
    tip.textContent = [`token ${i}`, `id: ${v.tokens[i]}`, `text: ${JSON.stringify(v.texts[i])}`,
      `logprob: ${v.mask[i] === 1 ? v.logp[i] : "– (not generated)"}`, `loss_mask: ${v.mask[i]}`,
      `version: ${v.versions[i] === null ? "– (fresh)" : v.versions[i]}`, `turn: ${turn}`, i >= v.freshFrom ? "fresh (tokenized now, not recorded)" : "exact"].join("\n");
    tip.dataset.i = i;
    tip.dataset.id = v.tokens[i];
    tip.dataset.logprob = v.logp[i];
    tip.hidden = false;
    const r = el.getBoundingClientRect();
    tip.style.left = Math.min(window.innerWidth - 430, r.left) + "px";
    tip.style.top = (r.bottom + 6 + 160 > window.innerHeight ? r.top - 160 : r.bottom + 6) + "px";
  });
  $("tokens").addEventListener("mouseleave", () => {
    tip.hidden = true;
    if (lit) lit.classList.remove("hl");
    lit = null;
  });

  // --- start -------------------------------------------------------------------------------------------
  (async () => {
    await refresh();
    const h = new URLSearchParams(location.hash.slice(1));
    if (h.get("session")) openSession(h.get("session"), +(h.get("t") || 0));
  })();
})();
