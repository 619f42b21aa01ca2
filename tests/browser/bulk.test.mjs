// Drives the event-log page's bulk replay in headless Chromium (Debian's
// package), as tests/ops.rs `browser_bulk_replays_failed_events_after_confirmation_and_refuses_a_forged_post`
// asks (issue 16): log in, filter to a source with failed events, press
// "Replay failed (N)", read the count on the confirmation page, confirm, see
// the flash; then a page on another origin submits the same form to the
// admin listener and must be refused. The last line printed is a JSON summary
// the Rust test checks. Any failed expectation exits 1.
//
//   ADMIN_URL    http://127.0.0.1:PORT of the admin listener
//   ADMIN_TOKEN  the admin token (the page's login form takes it)
//   SOURCE       a source with exactly FAILED failed events (one delivery each)
//   FAILED       how many
//   CHROMIUM     the browser binary (default /usr/bin/chromium)
//   PROFILE_DIR  a fresh user-data dir

import { expect, login, need, run } from './lib.mjs';

const base = need('ADMIN_URL');
const token = need('ADMIN_TOKEN');
const source = need('SOURCE');
const failed = Number(need('FAILED'));
// Another origin on loopback too (localhost, not 127.0.0.1), so the browser's
// own local-network rules cannot be what stops the forged request: the
// daemon must. Playwright answers for it; nothing listens there.
const evil = 'http://localhost:18099/forged';

const summary = {};
await run(summary, async (page) => {
  // 1. Log in.
  await login(page, base, token);

  // 2. Filter to the source; the bulk button counts its failed deliveries.
  await page.fill('input[name=source]', source);
  await Promise.all([page.waitForURL(new RegExp(`source=${source}`)), page.click('#apply')]);
  summary.button = (await page.locator('#bulk-replay').innerText()).trim();
  expect(summary.button === `Replay failed (${failed})`, `the button counts ${failed}: "${summary.button}"`);

  // 3. Press it: a confirmation page with the count, nothing changed yet.
  await Promise.all([page.waitForURL(/\/replay\?/), page.click('#bulk-replay')]);
  summary.confirm_deliveries = Number(await page.locator('#bulk-deliveries').innerText());
  summary.confirm_events = Number(await page.locator('#bulk-events').innerText());
  summary.confirm_text = (await page.locator('#bulk-count').innerText()).trim();
  expect(await page.locator('#cancel').isVisible(), 'the confirmation offers Cancel');

  // 4. Confirm: back on the filtered list with the flash.
  await Promise.all([page.waitForURL(/requeued=/), page.click('#confirm')]);
  expect(page.url().includes(`source=${source}`), `back on the filtered list: ${page.url()}`);
  summary.flash = (await page.locator('#requeued').innerText()).trim();

  // 5. Wait until the re-queued deliveries have failed again, so the same
  //    form would re-queue them all once more if the daemon took it.
  const deadline = Date.now() + 20000;
  for (;;) {
    await page.goto(`${base}/?source=${source}`);
    if ((await page.locator('#bulk-replay').count()) && (await page.locator('#bulk-replay').innerText()).includes(`(${failed})`)) break;
    expect(Date.now() < deadline, 'the replayed deliveries did not fail again');
    await page.waitForTimeout(250);
  }

  // 6. A page on another origin submits the confirmation form (no script:
  //    a person clicks its button).
  await page.route(evil, (route) => route.fulfill({
    status: 200,
    contentType: 'text/html',
    body: `<!doctype html><form method="post" action="${base}/replay">
      <input type="hidden" name="source" value="${source}"><input type="hidden" name="expect" value="${failed}">
      <button type="submit" id="win">Claim your prize</button></form>`,
  }));
  await page.goto(evil);
  const [forged] = await Promise.all([
    page.waitForResponse((r) => r.url() === `${base}/replay` && r.request().method() === 'POST'),
    page.click('#win'),
  ]);
  summary.forged_status = forged.status();
  summary.forged_body = await forged.text();
});
