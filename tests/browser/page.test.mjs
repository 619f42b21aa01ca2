// Drives the hooktrail event-log page in headless Chromium (Debian's package),
// as tests/ops.rs `browser_filters_opens_an_event_and_replays_it` asks:
// log in, filter the list, open an event, press replay, and watch the
// delivery run again. Inputs come from the environment; the last line printed
// is a JSON summary the Rust test checks. Any failed expectation exits 1.
//
//   ADMIN_URL    http://127.0.0.1:PORT of the admin listener
//   ADMIN_TOKEN  the admin token (the page's login form takes it)
//   TARGET_ID    an event of source `forms` with payload email lead@example.com,
//                delivered once to handler `ok`
//   CHROMIUM     the browser binary (default /usr/bin/chromium)
//   PROFILE_DIR  a fresh user-data dir

import { expect, login, need, run } from './lib.mjs';

const base = need('ADMIN_URL');
const token = need('ADMIN_TOKEN');
const target = need('TARGET_ID');

const summary = { dialogs: 0 };
await run(summary, async (page) => {
  // A payload's <script> must never run: any alert() would open a dialog.
  page.on('dialog', async (d) => { summary.dialogs += 1; await d.dismiss(); });

  // 1. The list needs a login first (the token is set).
  await login(page, base, token);
  expect(await page.locator('#events tr.event').count() >= 3, 'the list shows every event after login');
  expect(await page.locator('#chart rect').count() === 72, 'the chart draws 24 hours x 3 bars');

  // 2. Filter by source and payload content.
  await page.fill('input[name=source]', 'forms');
  await page.locator('input[name=match]').first().fill('/email=lead@example.com');
  await Promise.all([page.waitForURL(/source=forms/), page.click('#apply')]);
  const rows = page.locator('#events tr.event');
  summary.filtered_rows = await rows.count();
  expect(summary.filtered_rows === 1, `one event matches source=forms and the email, got ${summary.filtered_rows}`);
  expect((await rows.first().innerText()).includes(target), 'the matching row is the target event');

  // 3. Open it.
  await Promise.all([page.waitForURL(`${base}/events/${target}`), rows.first().locator('a').first().click()]);
  expect((await page.locator('h1').innerText()).includes(target), 'the detail page names the event');
  expect((await page.locator('#payload').innerText()).includes('<script>alert(1)</script>'), 'the payload shows the script as text');
  const attemptsNow = () => page.locator('section.delivery[data-handler=ok] tr.attempt').count();
  summary.attempts_before = await attemptsNow();

  // 4. Press replay and watch the attempt list grow.
  await Promise.all([page.waitForURL(/replayed=1/), page.click('#replay')]);
  expect(await page.locator('#replayed').isVisible(), 'the page confirms the replay');
  const deadline = Date.now() + 20000;
  summary.attempts_after = await attemptsNow();
  while (summary.attempts_after < summary.attempts_before + 1 || !(await page.locator('h1 .s-done').count())) {
    expect(Date.now() < deadline, `the delivery did not run again (attempts ${summary.attempts_after})`);
    await page.waitForTimeout(250);
    await page.reload();
    summary.attempts_after = await attemptsNow();
  }
  const last = page.locator('section.delivery[data-handler=ok] tr.attempt').last();
  expect((await last.innerText()).includes('success'), 'the new attempt succeeded');
});
