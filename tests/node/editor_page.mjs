// Opens the Node-RED editor through flowgate's editor listener in Debian's
// headless chromium (playwright-core), as an author would: logs in, waits
// until the debug sidebar shows messages from two replicas, opens a node
// (double click), renames it, clicks Done and Deploy, and waits for the
// editor's "Successfully deployed".
// usage: node editor_page.mjs URL USER PASSWORD NODE_ID NEW_NAME SCREENSHOT.png
// Before it clicks Deploy it prints {"ready": true} and waits for a line on
// stdin (the test starts its load then).
// stdout, at the end: one JSON line {"deployMs": ms from the click to the notification,
// "notification": its text, "debugNames": [node names in the debug sidebar],
// "errors": [...console and page errors], "failed": [...failed requests],
// "refused": ["step: status METHOD path" of each answer >= 400],
// "step": the last step reached}.
import { launch } from "./chromium.mjs";

const [url, user, password, nodeId, newName, screenshot] = process.argv.slice(2);
const out = { step: "start", errors: [], failed: [], debugNames: [], refused: [] };
const browser = await launch();
let page;
try {
  const context = await browser.newContext({ viewport: { width: 1400, height: 900 } });
  page = await context.newPage();
  page.on("console", (m) => { if (m.type() === "error") out.errors.push(`console: ${m.text()}`); });
  page.on("pageerror", (e) => out.errors.push(`page error: ${e.message}`));
  page.on("requestfailed", (r) => out.failed.push(`${r.url()} ${r.failure()?.errorText}`));
  page.on("response", (r) => {
    if (r.status() >= 400) out.refused.push(`${out.step}: ${r.status()} ${r.request().method()} ${new URL(r.url()).pathname}`);
  });
  // the editor's reads before the login (401) come while the page loads
  out.step = "login";
  await page.goto(url);
  await page.waitForSelector("#node-dialog-login-username", { timeout: 60000 });
  await page.fill("#node-dialog-login-username", user);
  await page.fill("#node-dialog-login-password", password);
  await page.click("#node-dialog-login-submit");
  out.step = "workspace";
  const node = `[id="${nodeId}"] rect.red-ui-flow-node`;
  await page.waitForSelector(node, { timeout: 60000 });
  out.step = "debug sidebar";
  await page.evaluate(() => RED.sidebar.show("debug"));
  const replicasSeen = () => {
    const names = [...document.querySelectorAll(".red-ui-debug-msg-name")].map((e) => e.textContent);
    return new Set(names.map((n) => (n.match(/replica \S+/) || [])[0]).filter(Boolean)).size;
  };
  await page.waitForFunction(`(${replicasSeen})() >= 2`, null, { timeout: 30000 });
  out.debugNames = [...new Set(await page.$$eval(".red-ui-debug-msg-name", (els) => els.map((e) => e.textContent.trim())))].sort();
  out.step = "edit";
  await page.dblclick(node);
  await page.waitForSelector("#node-input-name", { state: "visible", timeout: 15000 });
  await page.fill("#node-input-name", newName);
  await page.click("#node-dialog-ok");
  await page.waitForSelector("#node-input-name", { state: "detached", timeout: 15000 });
  out.step = "waiting for go";
  console.log(JSON.stringify({ ready: true }));
  await new Promise((resolve) => {
    process.stdin.once("data", resolve);
    process.stdin.once("end", resolve);
  });
  process.stdin.destroy();
  out.step = "deploy";
  const clicked = Date.now();
  await page.click("#red-ui-header-button-deploy");
  // the deploy's own notification: success or the error it shows
  const note = await page.waitForFunction(() => {
    const all = [...document.querySelectorAll(".red-ui-notification")].map((e) => e.textContent.trim());
    return all.find((t) => /Successfully deployed|Error|rror/.test(t)) || null;
  }, null, { timeout: 180000, polling: 20 });
  out.deployMs = Date.now() - clicked;
  out.notification = await note.jsonValue();
  out.step = "done";
} catch (e) {
  out.errors.push(`driver (${out.step}): ${e.message}`);
} finally {
  if (page) await page.screenshot({ path: screenshot }).catch(() => {});
  console.log(JSON.stringify(out));
  await browser.close();
}
