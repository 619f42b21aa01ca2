// What the event-log page's browser scripts share: their inputs, their
// expectations, a headless Chromium (Debian's package) with a fresh profile,
// the login, and the JSON summary the Rust test reads from the last line.

import { chromium } from 'playwright-core';

/** The environment variable `k`; a script cannot run without it. */
export const need = (k) => {
  const v = process.env[k];
  if (!v) throw new Error(`${k} is not set`);
  return v;
};

/** Fails the script (exit 1) naming what was expected. */
export function expect(cond, what) {
  if (!cond) throw new Error(`expectation failed: ${what}`);
}

/**
 * Runs `steps(page)` in headless Chromium with the profile in PROFILE_DIR
 * (browser binary: CHROMIUM, default /usr/bin/chromium), then prints
 * `summary` as one JSON line. On failure prints where the page was and what
 * it showed, and rethrows.
 */
export async function run(summary, steps) {
  const context = await chromium.launchPersistentContext(need('PROFILE_DIR'), {
    executablePath: process.env.CHROMIUM || '/usr/bin/chromium',
    headless: true,
    args: [
      '--headless', '--no-sandbox', '--disable-gpu', '--disable-quic', '--no-first-run',
      '--disable-background-networking', '--disable-component-update', '--disable-sync',
    ],
  });
  try {
    const page = context.pages()[0] ?? (await context.newPage());
    page.setDefaultTimeout(15000);
    await steps(page);
  } catch (e) {
    const page = context.pages()[0];
    if (page) console.error(`at ${page.url()}:\n${(await page.content()).slice(0, 4000)}`);
    throw e;
  } finally {
    await context.close();
  }
  console.log(JSON.stringify(summary));
}

/** The list needs a login first (the token is set): the form, then the list. */
export async function login(page, base, token) {
  const resp = await page.goto(`${base}/`);
  expect(resp.status() === 401, `first visit answers 401 with the login form, got ${resp.status()}`);
  await page.fill('#token', token);
  await Promise.all([page.waitForResponse((r) => r.url().endsWith('/login')), page.click('#login')]);
  await page.waitForSelector('#events');
}
