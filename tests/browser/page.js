// Opens predictord's status page in Debian's chromium (headless), at a desktop's width and a phone's, and reports
// what a person would see there.
//   node page.js URL DESKTOP_PNG PHONE_PNG API[,API...] DETAIL_API FILTER_API
// Prints one JSON line: console errors, the page's text at each width, what a chart shows on hover, the detail
// view's text, the events left by the API filter, overflow at the phone's width, and whether any markup came from
// predictor strings.
const { chromium } = require("playwright-core");

async function open(browser, url, width, names, errors) {
  const page = await browser.newPage({ viewport: { width, height: 900 } });
  page.on("console", (m) => { if (m.type() === "error") errors.push(m.text()); });
  page.on("pageerror", (e) => errors.push(String(e)));
  page.on("dialog", async (d) => { errors.push("dialog: " + d.message()); await d.dismiss(); });
  await page.goto(url, { waitUntil: "load" });
  for (const n of names) await page.waitForSelector(`[data-api="${n}"]`, { timeout: 20000 });
  return page;
}

(async () => {
  const [url, desktopShot, phoneShot, apis, detailApi, filterApi] = process.argv.slice(2);
  const names = apis.split(",");
  const browser = await chromium.launch({
    executablePath: process.env.CHROMIUM || "/usr/bin/chromium",
    args: ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
           "--disable-background-networking", "--disable-component-update", "--disable-sync"],
  });
  const errors = [];
  const out = { errors };
  // Desktop: charts fill in, hover shows values, details open, the events filter works.
  const desk = await open(browser, url, 1400, names, errors);
  const rps = `[data-api="${names[0]}"] svg[data-chart="requests"]`;
  out.chartPointsBefore = Number(await desk.$eval(rps, (s) => s.dataset.points));
  await desk.waitForFunction((sel) => {
    const s = document.querySelector(sel);
    return s && Number(s.dataset.points) >= 2 && Number(s.dataset.last) > 0;
  }, rps, { timeout: 45000, polling: 500 });
  out.chartPointsAfter = Number(await desk.$eval(rps, (s) => s.dataset.points));
  out.scales = await desk.$$eval('svg[data-chart="requests"]', (all) => all.map((s) => s.dataset.max));
  const box = await desk.locator(rps).boundingBox();
  await desk.mouse.move(box.x + box.width - 12, box.y + box.height / 2);
  out.hover = await desk.$eval(rps, (s) => s.dataset.hover || "");
  out.axis = await desk.$eval(rps, (s) => [...s.querySelectorAll("text")].map((t) => t.textContent));
  await desk.mouse.move(0, 0);
  await desk.click(`[data-api="${detailApi}"] button`);
  await desk.waitForSelector(`[data-api="${detailApi}"] .details`, { timeout: 10000 });
  out.details = await desk.$eval(`[data-api="${detailApi}"] .details`, (d) => d.innerText);
  out.detailCharts = await desk.$$eval(`[data-api="${detailApi}"] .details svg`, (all) => all.map((s) => s.dataset.chart));
  await desk.selectOption("#filter", filterApi);
  await desk.waitForTimeout(100);
  out.filtered = await desk.$$eval("#events tr:not(.head)", (rows) => rows.map((r) => r.dataset.api));
  out.desktopText = await desk.evaluate(() => document.body.innerText);
  out.injected = await desk.evaluate(() => document.querySelectorAll(".err *").length);
  await desk.screenshot({ path: desktopShot, fullPage: true });
  // Phone: nothing wider than the screen, and an event's cells each on one line.
  const phone = await open(browser, url, 420, names, errors);
  await phone.waitForSelector("#events tr:not(.head)", { timeout: 20000 });
  out.phoneOverflow = await phone.evaluate(() => document.documentElement.scrollWidth - window.innerWidth);
  out.phoneKindLines = await phone.$$eval("#events tr:not(.head) td:nth-child(2)", (tds) =>
    tds.map((td) => Math.round(td.getBoundingClientRect().height / parseFloat(getComputedStyle(td).lineHeight))));
  out.phoneText = await phone.evaluate(() => document.body.innerText);
  await phone.screenshot({ path: phoneShot, fullPage: true });
  console.log(JSON.stringify(out));
  await browser.close();
})().catch((e) => { console.log(JSON.stringify({ fatal: String(e) })); process.exit(1); });
