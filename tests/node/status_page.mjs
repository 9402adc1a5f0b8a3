// Opens flowgate's /status page in Debian's headless chromium (driven by
// playwright-core, no downloaded browser), waits until it shows `expect`
// replicas with rates, saves a screenshot, and prints one JSON line:
// {"errors": [...console errors, page errors, failed requests...], "text": "..."}.
// usage: node status_page.mjs URL SCREENSHOT.png EXPECTED_REPLICAS
import { launch } from "./chromium.mjs";

const [url, screenshot, expectRaw] = process.argv.slice(2);
const expected = Number(expectRaw || "1");
const errors = [];
const browser = await launch();
try {
  const page = await browser.newPage({ viewport: { width: 1200, height: 900 } });
  page.on("console", (m) => { if (m.type() === "error") errors.push(`console: ${m.text()}`); });
  page.on("pageerror", (e) => errors.push(`page error: ${e.message}`));
  page.on("requestfailed", (r) => errors.push(`request failed: ${r.url()} ${r.failure()?.errorText}`));
  page.on("response", (r) => { if (r.status() >= 400) errors.push(`HTTP ${r.status()}: ${r.url()}`); });
  await page.goto(url, { waitUntil: "load" });
  // rows of MQTT replicas with a measured rate (a number, not "-"), and charts drawn
  await page.waitForFunction((n) => {
    const rows = [...document.querySelectorAll("section table tr")].filter((tr) => /connected/.test(tr.textContent));
    const rated = rows.filter((tr) => /^\d+\.\d$/.test(tr.children[3]?.textContent || ""));
    const lines = document.querySelectorAll("section svg polyline").length;
    return rated.length >= n && lines >= n;
  }, expected, { timeout: 15000 });
  // a few more seconds so the charts have a history worth looking at
  await page.waitForTimeout(Number(process.env.STATUS_SETTLE_MS || "3000"));
  await page.screenshot({ path: screenshot, fullPage: true });
  const text = await page.evaluate(() => document.body.innerText);
  console.log(JSON.stringify({ errors, text }));
} catch (e) {
  console.log(JSON.stringify({ errors: [...errors, `driver: ${e.message}`], text: "" }));
} finally {
  await browser.close();
}
