// Runs one Node-side script against the ComfyUI page in headless Chromium (playwright-core).
//   node page.cjs <url> <script.cjs> <args.json> <result.json>
// The script exports async (page, args) => value. The result file gets
// {value, pageErrors, consoleErrors, notFound (URLs answered 404)}; every uncaught page error is collected, never
// swallowed.
const fs = require("fs");
const { chromium } = require("playwright-core");

(async () => {
  const [url, scriptPath, argsPath, resultPath] = process.argv.slice(2);
  const args = JSON.parse(fs.readFileSync(argsPath, "utf8"));
  const out = { value: null, pageErrors: [], consoleErrors: [], blockedRequests: [], notFound: [] };
  const browser = await chromium.launch({
    executablePath: process.env.CHROMIUM || "/usr/bin/chromium",
    headless: true,
    args: ["--no-sandbox", "--disable-gpu", "--disable-quic", "--disable-background-networking",
           "--disable-component-update", "--disable-sync", "--no-first-run"],
  });
  let code = 0;
  try {
    const page = await browser.newPage({ viewport: { width: 1400, height: 900 } });
    // Only loopback: a result must never depend on the network (fonts, CDNs, telemetry the page may ask for).
    await page.route("**/*", (route) => {
      const u = new URL(route.request().url());
      const loopback = ["localhost", "[::1]"].includes(u.hostname) || /^127\./.test(u.hostname);
      if (loopback || ["data:", "blob:"].includes(u.protocol)) return route.continue();
      out.blockedRequests.push(u.origin);
      return route.abort("blockedbyclient");
    });
    page.on("pageerror", (e) => out.pageErrors.push(String((e && e.stack) || e)));
    page.on("console", (m) => { if (m.type() === "error") out.consoleErrors.push(m.text()); });
    page.on("response", (r) => { if (r.status() === 404) out.notFound.push(r.url()); });
    await page.goto(url, { waitUntil: "networkidle", timeout: 120000 });
    await page.waitForFunction(() => window.app && window.app.graph && window.LiteGraph, null, { timeout: 120000 });
    await page.waitForTimeout(500);
    out.value = await require(require("path").resolve(scriptPath))(page, args);
  } catch (e) {
    out.error = String((e && e.stack) || e);
    code = 1;
  } finally {
    await browser.close();
  }
  fs.writeFileSync(resultPath, JSON.stringify(out));
  process.exit(code);
})();
