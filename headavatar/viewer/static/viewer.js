// headavatar viewer: sends the view state to the server and shows the frame the trained model renders for it.
"use strict";
(function () {
  const INFO = JSON.parse(document.getElementById("info").textContent);
  const $ = (id) => document.getElementById(id);
  const img = $("frame"), view = $("view"), statusEl = $("status");
  const state = { f: 0, canonical: false, az: 0, el: 0, zoom: 1, yaw: 0, pitch: 0, roll: 0, jaw: 0, x: {}, light: "", s: INFO.size };
  let inflight = false, pending = null, playing = false, dragging = false, objectUrl = null;

  function query(fast) {
    const q = new URLSearchParams();
    q.set("f", state.canonical ? -1 : state.f);
    for (const k of ["az", "el", "zoom", "yaw", "pitch", "roll", "jaw"]) if (state[k] !== (k === "zoom" ? 1 : 0)) q.set(k, state[k].toFixed(3));
    const x = Object.entries(state.x).filter(([, v]) => v !== 0).map(([k, v]) => `${k}:${v.toFixed(4)}`);
    if (x.length) q.set("x", x.join(","));
    if (state.light) q.set("light", state.light);
    // while dragging, half the pixels keep the orbit responsive; the full frame follows on release
    q.set("s", fast ? Math.max(32, Math.round(state.s / 2)) : state.s);
    return q.toString();
  }

  // At most one request in flight; changes made meanwhile collapse into the next one.
  function refresh(fast) {
    if (inflight) { pending = { fast: !!fast }; return; }
    inflight = true;
    const t0 = performance.now();
    fetch("/render?" + query(fast)).then(async (r) => {
      if (!r.ok) { setStatus(await r.text(), true); return; }
      const blob = await r.blob();
      const url = URL.createObjectURL(blob);
      img.src = url;
      if (objectUrl) URL.revokeObjectURL(objectUrl);
      objectUrl = url;
      const where = state.canonical ? "canonical pose" : `frame ${state.f}`;
      setStatus(`${where} · rendered in ${r.headers.get("X-Render-Ms")} ms`);
    }).catch(() => setStatus("the viewer server is not answering", true)).finally(() => {
      inflight = false;
      if (pending) { const p = pending; pending = null; refresh(p.fast); }
      else if (playing) { setTimeout(step, Math.max(0, 1000 / INFO.fps - (performance.now() - t0))); }
    });
  }

  function setStatus(text, bad) { statusEl.textContent = text; statusEl.style.color = bad ? "#f88" : ""; }

  // ---- sequence
  const frameSlider = $("frame-slider"), frameOut = $("frame-out");
  frameSlider.max = Math.max(0, INFO.num_frames - 1);
  function setFrame(i) { state.f = i; frameSlider.value = i; frameOut.textContent = i; }
  frameSlider.addEventListener("input", () => { setFrame(+frameSlider.value); state.canonical = false; $("canonical").checked = false; refresh(); });
  $("canonical").addEventListener("change", (e) => { state.canonical = e.target.checked; refresh(); });
  function step() { if (!playing) return; setFrame((state.f + 1) % INFO.num_frames); refresh(); }
  function togglePlay() {
    playing = !playing;
    $("play").textContent = playing ? "❚❚ Pause" : "▶ Play";
    if (playing) { state.canonical = false; $("canonical").checked = false; step(); }
  }
  $("play").addEventListener("click", togglePlay);
  document.addEventListener("keydown", (e) => { if (e.code === "Space" && e.target.tagName !== "INPUT") { e.preventDefault(); togglePlay(); } });

  // ---- camera: drag to orbit, wheel to zoom
  let last = null;
  view.addEventListener("pointerdown", (e) => { dragging = true; last = [e.clientX, e.clientY]; view.setPointerCapture(e.pointerId); view.classList.add("dragging"); });
  view.addEventListener("pointermove", (e) => {
    if (!dragging) return;
    state.az -= (e.clientX - last[0]) * 0.4;
    state.el = Math.max(-85, Math.min(85, state.el + (e.clientY - last[1]) * 0.3));
    last = [e.clientX, e.clientY];
    refresh(true);
  });
  const endDrag = () => { if (dragging) { dragging = false; view.classList.remove("dragging"); refresh(); } };
  view.addEventListener("pointerup", endDrag);
  view.addEventListener("pointercancel", endDrag);
  view.addEventListener("wheel", (e) => { e.preventDefault(); state.zoom = Math.max(0.2, Math.min(5, state.zoom * Math.exp(e.deltaY * 0.001))); refresh(); }, { passive: false });
  function resetView() { state.az = 0; state.el = 0; state.zoom = 1; refresh(); }
  view.addEventListener("dblclick", resetView);
  $("reset-view").addEventListener("click", resetView);
  const sizeSel = $("size");
  for (const s of [...new Set([Math.max(32, Math.round(INFO.size / 2)), INFO.size, Math.min(2048, INFO.size * 2)])]) {
    const o = document.createElement("option"); o.value = s; o.textContent = `${s}px`; o.selected = s === INFO.size; sizeSel.appendChild(o);
  }
  sizeSel.addEventListener("change", () => { state.s = +sizeSel.value; refresh(); });

  // ---- sliders
  function slider(parent, label, min, max, stepv, get, set) {
    const l = document.createElement("label"); l.className = "slider";
    const out = document.createElement("output");
    const inp = document.createElement("input");
    Object.assign(inp, { type: "range", min, max, step: stepv, value: get() });
    const show = () => { out.textContent = (+inp.value).toFixed(2); };
    inp.addEventListener("input", () => { set(+inp.value); show(); refresh(); });
    l.append(label + " ", out, inp); parent.appendChild(l); show();
    return () => { inp.value = get(); show(); };
  }
  const poseDiv = $("pose"), poseResets = [];
  for (const [k, name, lo, hi] of [["yaw", "yaw (°)", -60, 60], ["pitch", "pitch (°)", -45, 45], ["roll", "roll (°)", -45, 45]].concat(INFO.has_jaw ? [["jaw", "jaw open (°)", -5, 30]] : [])) {
    poseResets.push(slider(poseDiv, name, lo, hi, 0.5, () => state[k], (v) => { state[k] = v; }));
  }
  $("reset-pose").addEventListener("click", () => { state.yaw = state.pitch = state.roll = state.jaw = 0; poseResets.forEach((r) => r()); refresh(); });
  const exprDiv = $("expressions"), exprResets = [];
  for (const e of INFO.expressions) {
    exprResets.push(slider(exprDiv, e.name, -e.range, e.range, e.range / 100, () => state.x[e.index] || 0, (v) => { state.x[e.index] = v; }));
  }
  $("reset-expr").addEventListener("click", () => { state.x = {}; exprResets.forEach((r) => r()); refresh(); });

  // ---- light (avatars that can be relit)
  if (INFO.lights.length) {
    $("light-section").hidden = false;
    const sel = $("light");
    for (const [v, t] of [["", "learnt light (training)"]].concat(INFO.lights.map((n) => [n, n]))) {
      const o = document.createElement("option"); o.value = v; o.textContent = t; sel.appendChild(o);
    }
    sel.addEventListener("change", () => { state.light = sel.value; setStatus("preparing the environment…"); refresh(); });
  }

  // where the page opens (/?f=N, /?play=1): the server already put that frame in the page
  if (INFO.start.frame < 0) { state.canonical = true; $("canonical").checked = true; } else setFrame(INFO.start.frame);
  if (INFO.start.play) togglePlay();

  $("title").textContent = `${INFO.subject}`;
  $("subtitle").textContent = `${INFO.method} · ${INFO.num_frames} frames · ${INFO.fps} fps`;
  const first = state.canonical ? "canonical pose" : `frame ${state.f}`;
  if (!playing) {
    setStatus(img.complete && img.naturalWidth ? first : "rendering…");
    img.addEventListener("load", () => { if (statusEl.textContent === "rendering…") setStatus(first); }, { once: true });
  }
})();
