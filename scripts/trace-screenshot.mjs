#!/usr/bin/env node
// Regenerates docs/images/trace-timeline.png, the README's screenshot of an
// interrupt trace (`tandem run GUEST --trace FILE.json`) in a timeline
// viewer. Not used by the tests or CI.
//
//   node scripts/trace-screenshot.mjs [TRACE.json] [OUT.png]
//
// Defaults: the trace is made here, by running
//   $TANDEM run $GUEST --backend interp --trace target/trace-screenshot/trace.json
// (TANDEM=target/release/tandem, GUEST=target/guests/pic_pit.elf; build them
// first with `cargo build --release --bin tandem` and `make -C tests/guests`),
// and the picture goes to docs/images/trace-timeline.png.
//
// The viewer is Catapult's Trace Viewer (the viewer behind the old
// chrome://tracing, which Chromium no longer ships): its tracing/bin/trace2html
// turns the JSON into one self-contained HTML page, which headless Chromium
// opens. The script then picks the complete interrupt chain (source line ->
// ... -> handler entry, the events sharing one bind_id) that is shortest from
// its source to the handler's EOI, zooms to it, turns the flow arrows on
// ("Flow events" > interrupt), selects the injection so the bottom panel
// shows its fields and flows, and screenshots the tracks and that panel.
// The interpreter's run is not deterministic, so each picture differs a bit.
//
// Needs:
//   - Node 18+ and playwright-core (`npm install -g playwright-core`, or set
//     PLAYWRIGHT_CORE to a directory holding node_modules/playwright-core);
//   - Chromium (Debian: `apt-get install chromium`; CHROMIUM=path overrides);
//   - a Catapult checkout (https://github.com/catapult-project/catapult) in
//     CATAPULT (default /tmp/catapult), and python3 for its trace2html.
// Environment: WIDTH / HEIGHT (default 1400 x 525) set the picture's size.
import { execFileSync } from 'node:child_process';
import { createRequire } from 'node:module';
import { mkdirSync, readFileSync, existsSync } from 'node:fs';
import path from 'node:path';

const root = path.resolve(path.dirname(new URL(import.meta.url).pathname), '..');
const env = process.env;
const outDir = path.join(root, 'target', 'trace-screenshot');
mkdirSync(outDir, { recursive: true });

let trace = process.argv[2];
let title = trace && path.basename(trace);
const png = path.resolve(process.argv[3] || path.join(root, 'docs', 'images', 'trace-timeline.png'));
if (!trace) {
  trace = path.join(outDir, 'trace.json');
  const tandem = env.TANDEM || path.join(root, 'target', 'release', 'tandem');
  const guest = env.GUEST || path.join(root, 'target', 'guests', 'pic_pit.elf');
  title = `tandem run ${path.basename(guest)} --backend interp --trace trace.json`;
  try {
    execFileSync(tandem, ['run', guest, '--backend', 'interp', '--trace', trace], { stdio: 'inherit' });
  } catch (e) {
    // The test guests leave through isa-debug-exit: status 1 is a pass.
    if (e.status !== 1) throw e;
  }
}
trace = path.resolve(trace);

// 1. The viewer page: Catapult's trace2html.
const catapult = env.CATAPULT || '/tmp/catapult';
const html = path.join(outDir, 'trace.html');
execFileSync('python3', [path.join(catapult, 'tracing', 'bin', 'trace2html'), trace,
  '--output', html, '--title', title], { stdio: 'inherit' });

// 2. The chain to show, from the JSON itself: events sharing a bind_id.
const events = JSON.parse(readFileSync(trace, 'utf8')).traceEvents;
const chains = new Map();
for (const e of events) {
  if (e.bind_id === undefined) continue;
  if (!chains.has(e.bind_id)) chains.set(e.bind_id, []);
  chains.get(e.bind_id).push(e);
}
const longest = Math.max(...[...chains.values()].map((c) => c.length));
const eoiAfter = (c) => events.find((e) => e.ts > c[c.length - 1].ts && /EOI/.test(e.name));
// The complete chain that is shortest from its source to the handler's EOI.
let chain, endTs;
for (const c of chains.values()) {
  if (c.length !== longest) continue;
  const eoi = eoiAfter(c);
  const end = eoi && eoi.ts - c[c.length - 1].ts < 200 ? eoi.ts
    : c[c.length - 1].ts + 2 * (c[c.length - 1].ts - c[0].ts);
  if (!chain || end - c[0].ts < endTs - chain[0].ts) { chain = c; endTs = end; }
}
const first = chain[0], last = chain[chain.length - 1];
const inject = chain.find((e) => e.args && e.args.event === 'Inject') || last;
console.log(`chain ${first.bind_id}: ${chain.map((e) => e.name).join(' -> ')}`);

// 3. Open it in Chromium and take the picture.
let pw;
try {
  pw = await import('playwright-core');
} catch {
  const base = env.PLAYWRIGHT_CORE ||
    execFileSync('npm', ['root', '-g'], { encoding: 'utf8' }).trim();
  const req = createRequire(path.join(base, 'x.js'));
  let p;
  try { p = req.resolve('playwright-core'); } catch { p = req.resolve(path.join(base, 'playwright-core')); }
  pw = await import(p);
}
const chromium = (pw.chromium || pw.default.chromium);
const executablePath = env.CHROMIUM || ['/usr/bin/chromium', '/usr/bin/chromium-browser']
  .find((p) => existsSync(p));
const browser = await chromium.launch({ executablePath, args: ['--no-sandbox'] });
const width = Number(env.WIDTH || 1400);
const page = await browser.newPage({ viewport: { width, height: Number(env.HEIGHT || 525) }, deviceScaleFactor: 1 });
await page.goto('file://' + html);
await page.waitForFunction(() => typeof g_timelineViewEl !== 'undefined' && g_timelineViewEl.model &&
  g_timelineViewEl.trackView);
// Let the viewer draw once (it sets its initial, whole-trace zoom then).
await page.waitForTimeout(1500);
const r = await page.evaluate(({ firstSeq, lastSeq, injectSeq, spanUs, endUs }) => {
  const view = g_timelineViewEl;
  const m = view.model;
  const bySeq = new Map();
  for (const e of m.getDescendantEvents()) {
    if (e.args && e.args.seq !== undefined) bySeq.set(e.args.seq, e);
  }
  const a = bySeq.get(firstSeq), z = bySeq.get(lastSeq), inj = bySeq.get(injectSeq);
  // Model times are in ms; the trace's ts in µs.
  const t0 = a.start, t1 = z.start + (endUs - spanUs) / 1000;
  const margin = (t1 - t0) * 0.08;
  const tv = view.trackView;
  const vp = tv.viewport;
  const dt = new tr.ui.TimelineDisplayTransform();
  dt.set(vp.currentDisplayTransform);
  dt.xSetWorldBounds(t0 - margin, t1 + margin, tv.modelTrackContainer_.canvas.width);
  vp.setDisplayTransformImmediately(dt);
  // "Flow events" > the trace's category ("interrupt"): draw every arrow.
  for (const f of m.flowEvents) view.selectedFlowEvents.add(f.category);
  view.brushingStateController.changeSelectionFromTimeline(new tr.model.EventSet([inj]));
  vp.dispatchChangeEvent();
  // Room for the selection's fields below the tracks; no mouse-mode palette.
  view.$.analysis.style.height = (innerHeight - 150) + 'px';
  const style = document.createElement('style');
  style.textContent = 'tr-ui-b-mouse-mode-selector { display: none !important; }';
  document.head.appendChild(style);
  return { flows: m.flowEvents.length, warnings: m.importWarnings.length };
}, { firstSeq: first.args.seq, lastSeq: last.args.seq, injectSeq: inject.args.seq,
  spanUs: last.ts - first.ts, endUs: endTs - first.ts });
console.log(`viewer: ${r.flows} flow arrows, ${r.warnings} import warnings`);
await page.waitForTimeout(1500);
mkdirSync(path.dirname(png), { recursive: true });
await page.screenshot({ path: png });
await browser.close();
console.log(`wrote ${png}`);
