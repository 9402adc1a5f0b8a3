// Opens a Dashboard 2.0 page through flowgate in Debian's headless chromium
// (driven by playwright-core, no downloaded browser) and reports what it
// shows while the test kills replicas behind it.
// usage: node dashboard_page.mjs URL SCREENSHOT.png [COOKIE=VALUE]
// (the cookie, e.g. flowgate's sticky one, is set before the page loads)
// stdout: one JSON line {"t": ms since start, "text": "..."} each time the
// page's text changes, from when the page has loaded whole (no request for
// 500 ms: socket.io is on its WebSocket); when stdin closes: a screenshot,
// then {"done": true, "errors": [...console errors, page errors...],
// "failed": [...requests that failed, with their URLs...],
// "transports": the socket.io transports the page used ("polling", "websocket")}.
import { launch } from "./chromium.mjs";

const [url, screenshot, cookie] = process.argv.slice(2);
const errors = [];
const failed = [];
const transports = new Set();
const t0 = Date.now();
let stop = false;
process.stdin.on("end", () => { stop = true; });
process.stdin.on("error", () => { stop = true; });
process.stdin.resume();
const browser = await launch();
try {
  const context = await browser.newContext({ viewport: { width: 900, height: 500 } });
  if (cookie) {
    const [name, value] = cookie.split("=");
    await context.addCookies([{ name, value, url }]);
  }
  const page = await context.newPage();
  page.on("console", (m) => { if (m.type() === "error") errors.push(`console: ${m.text()}`); });
  page.on("pageerror", (e) => errors.push(`page error: ${e.message}`));
  page.on("requestfailed", (r) => failed.push(`${r.url()} ${r.failure()?.errorText}`));
  page.on("request", (r) => { if (/socket\.io\/.*transport=polling/.test(r.url())) transports.add("polling"); });
  page.on("websocket", (ws) => { if (/socket\.io\//.test(ws.url())) transports.add("websocket"); });
  await page.goto(url, { waitUntil: "networkidle" });
  let last = null;
  while (!stop) {
    const text = await page.evaluate(() => document.body.innerText).catch(() => null);
    if (text !== null && text !== last) {
      last = text;
      console.log(JSON.stringify({ t: Date.now() - t0, text }));
    }
    await page.waitForTimeout(50);
  }
  await page.screenshot({ path: screenshot });
} catch (e) {
  errors.push(`driver: ${e.message}`);
} finally {
  console.log(JSON.stringify({ done: true, errors, failed, transports: [...transports].sort() }));
  await browser.close();
}
