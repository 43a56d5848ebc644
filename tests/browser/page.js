// Opens predictord's status page in Debian's chromium (headless) and reports what a person would see.
//   node page.js URL SCREENSHOT API[,API...]
// Prints one JSON line: console errors, the page's text, and whether any markup came from predictor strings.
const { chromium } = require("playwright-core");

(async () => {
  const [url, shot, apis] = process.argv.slice(2);
  const browser = await chromium.launch({
    executablePath: process.env.CHROMIUM || "/usr/bin/chromium",
    args: ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
           "--disable-background-networking", "--disable-component-update", "--disable-sync"],
  });
  const page = await browser.newPage({ viewport: { width: 420, height: 900 } }); // a phone's width
  const errors = [];
  page.on("console", (m) => { if (m.type() === "error") errors.push(m.text()); });
  page.on("pageerror", (e) => errors.push(String(e)));
  page.on("dialog", async (d) => { errors.push("dialog: " + d.message()); await d.dismiss(); });
  await page.goto(url, { waitUntil: "load" });
  const names = apis.split(",");
  for (const n of names) await page.waitForSelector(`[data-api="${n}"]`, { timeout: 20000 });
  const first = await page.$eval(`[data-api="${names[0]}"] svg[data-chart$="requests/s"]`, (s) => s.dataset.points);
  await page.waitForFunction((n) => {
    const s = document.querySelector(`[data-api="${n}"] svg[data-chart$="requests/s"]`);
    return s && Number(s.dataset.points) >= 2 && Number(s.dataset.last) > 0;
  }, names[0], { timeout: 45000, polling: 500 });
  const after = await page.$eval(`[data-api="${names[0]}"] svg[data-chart$="requests/s"]`, (s) => s.dataset.points);
  await page.screenshot({ path: shot, fullPage: true });
  const text = await page.evaluate(() => document.body.innerText);
  const injected = await page.evaluate(() => document.querySelectorAll(".err *").length);
  console.log(JSON.stringify({ errors, text, injected, chartPointsBefore: Number(first), chartPointsAfter: Number(after) }));
  await browser.close();
})().catch((e) => { console.log(JSON.stringify({ fatal: String(e) })); process.exit(1); });
