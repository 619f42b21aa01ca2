//! Every seed sender end to end through the real binary, from the files in
//! `examples/` (issue 6, "One test per seed sender"): the config is the
//! example's own `hooktrail.toml` (its `[sources.*]` tables untouched; only
//! the listen addresses and database path are pointed at the test's temp dir)
//! plus a handler routed to the source; the request is the example's body file
//! sent the way its `send.sh` sends it. Each test checks the answer, the stored
//! event (`events show --json`: raw body byte-exact, content type, normalized
//! payload, token redacted) and what the fake CRM or forward peer received.

mod common;

use common::*;
use serde_json::{json, Value};

const HUBSPOT_TOKEN: &str = "pat-na1-seeds-0000";

/// A file of `examples/DIR/`, read at test time.
fn example(dir: &str, name: &str) -> Vec<u8> {
    let path = format!("{}/examples/{dir}/{name}", env!("CARGO_MANIFEST_DIR"));
    std::fs::read(&path).unwrap_or_else(|e| panic!("reading {path}: {e}"))
}

fn example_text(dir: &str, name: &str) -> String {
    String::from_utf8(example(dir, name)).unwrap_or_else(|e| panic!("examples/{dir}/{name} is not UTF-8: {e}"))
}

/// `text` with the only occurrence of `from` replaced (panics if there is not exactly one).
fn replace_once(text: &str, from: &str, to: &str) -> String {
    let n = text.matches(from).count();
    assert_eq!(n, 1, "expected `{from}` exactly once in the example config, found it {n} times");
    text.replacen(from, to, 1)
}

/// The example's `hooktrail.toml` with `[server]`, `[storage]` and `[admin]` pointed
/// at a temp dir (ephemeral ports, a ready file), then fast polling and
/// retries (3 attempts) and `handlers` appended.
fn env_from_example(dir: &str, handlers: &str) -> TestEnv {
    let env = TestEnv::raw("");
    let text = example_text(dir, "hooktrail.toml");
    let text = replace_once(
        &text,
        "listen = \"127.0.0.1:8080\"",
        &format!("listen = \"127.0.0.1:0\"\nready_file = {}", toml_str(&env.ready_file().to_string_lossy())),
    );
    let text =
        replace_once(&text, &format!("path = \"./data/{dir}.db\""), &format!("path = {}", toml_str(&env.db_path().to_string_lossy())));
    let text = replace_once(&text, "listen = \"127.0.0.1:9090\"", "listen = \"127.0.0.1:0\"");
    env.write_config(&format!("{text}\n{}\n{handlers}", fast_retries(3, "500ms", "")));
    env
}

/// A HubSpot `crm_upsert` handler `name` talking to `crm`, with `keys` (fields, records…).
fn hubspot_handler(name: &str, crm: &FakePeer, keys: &str) -> String {
    format!(
        "[handlers.{name}]\ntype = \"crm_upsert\"\nprovider = \"hubspot\"\nbase_url = {}\ntoken_env = \"HUBSPOT_TOKEN\"\n{keys}\n\n",
        toml_str(&crm.url(""))
    )
}

/// A `[[routes]]` entry with an optional `match = […]` line.
fn route_matching(source: &str, handler: &str, matches: &str) -> String {
    format!("{}{matches}\n\n", route(source, handler))
}

/// Percent-encodes every byte, as the examples' `send.sh` do for a token in the URL.
fn urlencode_all(s: &str) -> String {
    s.bytes().map(|b| format!("%{b:02x}")).collect()
}

/// Waits for the event to settle and checks it has exactly one delivery, to
/// `handler`, which succeeded on its first attempt with HTTP 200; returns the
/// event and that attempt's output.
fn settled_with_one_success(env: &TestEnv, id: &str, handler: &str) -> (Value, String) {
    let ev = wait_settled(env, id);
    assert_eq!(ev["status"], "done", "{ev:#}");
    let deliveries = ev["deliveries"].as_array().unwrap_or_else(|| panic!("no deliveries: {ev:#}"));
    assert_eq!(deliveries.len(), 1, "routed to `{handler}` only: {ev:#}");
    let del = delivery(&ev, handler);
    assert_eq!(del["status"], "succeeded", "{ev:#}");
    let tries = attempts(del);
    assert_eq!(tries.len(), 1, "{del:#}");
    assert_eq!((&tries[0]["outcome"], &tries[0]["http_status"]), (&json!("success"), &json!(200)), "{del:#}");
    let output = tries[0]["output"].as_str().unwrap_or_default().to_string();
    (ev.clone(), output)
}

/// The stored raw body, method, content type and size are exactly what was sent.
fn assert_stored_as_sent(ev: &Value, source: &str, method: &str, content_type: &str, body: &[u8]) {
    assert_eq!(ev["source"], source, "{ev:#}");
    assert_eq!(ev["method"], method, "{ev:#}");
    assert_eq!(ev["content_type"], content_type, "{ev:#}");
    assert_eq!(ev["body_bytes"], body.len(), "{ev:#}");
    let text = std::str::from_utf8(body).expect("the example bodies are UTF-8");
    assert_eq!(ev["body"].as_str(), Some(text), "raw body byte-exact: {ev:#}");
}

/// The one HubSpot request `crm` received: POST to the batch upsert with the
/// bearer token; returns its JSON body.
fn one_hubspot_request(crm: &FakePeer) -> Value {
    let got = crm.requests();
    assert_eq!(got.len(), 1, "exactly one CRM request: {got:#?}");
    let req = &got[0];
    assert_eq!((req.method.as_str(), req.path.as_str()), ("POST", HUBSPOT_PATH));
    assert_eq!(req.header("authorization"), Some(format!("Bearer {HUBSPOT_TOKEN}").as_str()));
    req.json()
}

// --- Net-Results / Paminga ---------------------------------------------------------

const NR_TOKEN: &str = "nr-token-5f1c0a9e";
const NR_PATH: &str = "/hooks/netresults";

/// A daemon on the Net-Results example with the three handlers its comments
/// suggest, each routed by what only its kind of webhook carries; both tokens set.
fn start_netresults(crm: &FakePeer) -> (TestEnv, Daemon) {
    let mut h = hubspot_handler(
        "crm",
        crm,
        r#"id_property = "email"
fields = { email = "/submission_values/email_address/0", firstname = "/submission_values/first_name/0", lastname = "/submission_values/last_name/0", company = "/submission_values/company_name/0" }"#,
    );
    h += &route_matching("netresults", "crm", r#"match = [{ pointer = "/form_completion_id", exists = true }]"#);
    h += &hubspot_handler(
        "crm_campaign",
        crm,
        r#"id_property = "netresults_contact_id"
records = "/CampaignActionQualification/*/Campaign/*/CampaignAction/*/Contacts/*/*"
fields = { netresults_contact_id = "" }
batch_size = 2"#,
    );
    h += &route_matching("netresults", "crm_campaign", r#"match = [{ pointer = "/CampaignActionQualification", exists = true }]"#);
    h += &hubspot_handler(
        "crm_alert",
        crm,
        r#"id_property = "email"
fields = { email = "/email_address", netresults_contact_id = "/contact_id", last_alert = "/alert_name" }"#,
    );
    h += &route_matching("netresults", "crm_alert", r#"match = [{ pointer = "/alert_id", exists = true }]"#);
    let env = env_from_example("netresults", &h);
    let d = env.daemon().env("NR_TOKEN", NR_TOKEN).env("HUBSPOT_TOKEN", HUBSPOT_TOKEN).start();
    (env, d)
}

/// Posts an example body as `send.sh` does (`post_json FILE`).
fn netresults_send(d: &Daemon, file: &str) -> String {
    let body = example("netresults", file);
    d.request("POST", NR_PATH).header("Content-Type", "application/json").header("X-Webhook-Token", NR_TOKEN).body(body).send().id()
}

/// Stored as sent, payload = the JSON, token header redacted and nowhere in the event.
fn assert_netresults_stored(ev: &Value, file: &str) {
    let body = example("netresults", file);
    assert_stored_as_sent(ev, "netresults", "POST", "application/json", &body);
    let sent: Value = serde_json::from_slice(&body).expect("the example is JSON");
    assert_eq!(ev["payload"], sent, "a JSON payload is the JSON as sent");
    assert_eq!(ev["headers"]["x-webhook-token"], "[redacted]", "{ev:#}");
    assert!(!ev.to_string().contains(NR_TOKEN), "the token is stored nowhere: {ev:#}");
}

#[test]
fn netresults_form_example_reaches_the_crm_as_one_upsert() {
    let crm = FakePeer::start(|req, _| hubspot_ok(req));
    let (env, d) = start_netresults(&crm);
    let id = netresults_send(&d, "form.json");

    let (ev, output) = settled_with_one_success(&env, &id, "crm");
    assert_netresults_stored(&ev, "form.json");
    assert_eq!(ev["payload"]["form_completion_id"], "4453534");
    assert!(output.starts_with("hubspot: 1 record(s) selected, 1 to send, 1 request(s) sent"), "{output}");
    assert_eq!(
        one_hubspot_request(&crm),
        json!({"inputs": [{
            "idProperty": "email",
            "id": "dgolden@mid-corp.com",
            "properties": {"email": "dgolden@mid-corp.com", "firstname": "Daniel", "lastname": "Golden", "company": "MidSize Corp"}
        }]})
    );
}

#[test]
fn netresults_campaign_example_upserts_every_contact_id_exactly_once_in_batches() {
    let crm = FakePeer::start(|req, _| hubspot_ok(req));
    let (env, d) = start_netresults(&crm);
    let id = netresults_send(&d, "campaign.json");

    let (ev, output) = settled_with_one_success(&env, &id, "crm_campaign");
    assert_netresults_stored(&ev, "campaign.json");
    assert_eq!(
        ev["payload"].pointer("/CampaignActionQualification/0/Campaign/0/CampaignAction/0/Contacts/2019-08-02T15:45:22+00:00"),
        Some(&json!([1234567, 12345678, 123456789]))
    );
    assert!(output.starts_with("hubspot: 3 record(s) selected, 3 to send, 2 request(s) sent"), "{output}");

    let got = crm.requests_to(HUBSPOT_PATH);
    assert_eq!(got.len(), 2, "3 ids with batch_size = 2 make 2 requests: {got:#?}");
    let mut sizes: Vec<usize> = got.iter().map(|r| r.json()["inputs"].as_array().map_or(0, Vec::len)).collect();
    sizes.sort_unstable();
    assert_eq!(sizes, [1, 2]);
    let mut sent = Vec::new();
    for req in &got {
        assert_eq!(req.header("authorization"), Some(format!("Bearer {HUBSPOT_TOKEN}").as_str()));
        for input in req.json()["inputs"].as_array().cloned().unwrap_or_default() {
            assert_eq!(input["idProperty"], "netresults_contact_id", "{input}");
            assert_eq!(input["properties"], json!({"netresults_contact_id": input["id"]}), "{input}");
            sent.push(input["id"].as_str().unwrap_or_else(|| panic!("id is HubSpot's string: {input}")).to_string());
        }
    }
    sent.sort();
    assert_eq!(sent, ["1234567", "12345678", "123456789"], "every contact id exactly once");
}

#[test]
fn netresults_alert_example_reaches_the_crm_as_one_upsert_by_email() {
    let crm = FakePeer::start(|req, _| hubspot_ok(req));
    let (env, d) = start_netresults(&crm);
    let id = netresults_send(&d, "alert.json");

    let (ev, output) = settled_with_one_success(&env, &id, "crm_alert");
    assert_netresults_stored(&ev, "alert.json");
    assert!(output.starts_with("hubspot: 1 record(s) selected, 1 to send, 1 request(s) sent"), "{output}");
    assert_eq!(
        one_hubspot_request(&crm),
        json!({"inputs": [{
            "idProperty": "email",
            "id": "dgolden@mid-corp.com",
            "properties": {"email": "dgolden@mid-corp.com", "netresults_contact_id": "749746728", "last_alert": "Visited the pricing page"}
        }]})
    );
}

// --- Email platform ----------------------------------------------------------------

#[test]
fn email_platform_test_event_example_reaches_the_crm_with_its_api_key_redacted() {
    const TOKEN: &str = "email-key-3b7d21";
    let crm = FakePeer::start(|req, _| hubspot_ok(req));
    let mut h = hubspot_handler(
        "crm",
        &crm,
        r#"id_property = "email"
fields = { email = "/data/email", firstname = "/data/firstname", lastname = "/data/lastname" }"#,
    );
    h += &route_matching("email-platform", "crm", r#"match = [{ pointer = "/event", equals = "automation.webhook.send" }]"#);
    let env = env_from_example("email-platform", &h);
    let d = env.daemon().env("EMAIL_WEBHOOK_TOKEN", TOKEN).env("HUBSPOT_TOKEN", HUBSPOT_TOKEN).start();
    let body = example("email-platform", "test-event.json");
    let resp = d
        .request("POST", "/hooks/email-platform")
        .header("Content-Type", "application/json")
        .header("X-Api-Key", TOKEN)
        .body(body.clone())
        .send();
    let id = resp.id();
    assert_eq!(resp.json(), json!({"id": id, "status": "accepted"}));

    let (ev, output) = settled_with_one_success(&env, &id, "crm");
    assert_stored_as_sent(&ev, "email-platform", "POST", "application/json", &body);
    assert_eq!(ev["payload"], serde_json::from_slice::<Value>(&body).expect("the example is JSON"));
    assert_eq!(ev["payload"]["id"], "test_evt_GppedVq2CWTWxUUxrm26bic0C");
    assert_eq!(ev["headers"]["x-api-key"], "[redacted]", "{ev:#}");
    assert!(!ev.to_string().contains(TOKEN), "the API key is stored nowhere: {ev:#}");
    assert!(output.starts_with("hubspot: 1 record(s) selected, 1 to send, 1 request(s) sent"), "{output}");
    assert_eq!(
        one_hubspot_request(&crm),
        json!({"inputs": [{
            "idProperty": "email",
            "id": "john.doe@example.org",
            "properties": {"email": "john.doe@example.org", "firstname": "John", "lastname": "Doe"}
        }]})
    );
}

// --- ONTRAPORT -----------------------------------------------------------------------

const ONTRAPORT_TOKEN: &str = "op-token/+= 9c4e";
const NOTE_PATH: &str = "/ontraport/note";

/// The ONTRAPORT example with a CRM upsert for contact posts (they carry `Email`)
/// and a forward for note posts (they carry `contact_id`, nothing a CRM upsert maps).
fn ontraport_env(peer: &FakePeer) -> TestEnv {
    let mut h = hubspot_handler("crm", peer, "id_property = \"email\"\nfields = { email = \"/Email\", firstname = \"/First_Name\" }");
    h += &route_matching("ontraport", "crm", r#"match = [{ pointer = "/Email", exists = true }]"#);
    h += &format!("[handlers.note_forward]\ntype = \"http\"\nurl = {}\nbody = \"raw\"\n\n", toml_str(&peer.url(NOTE_PATH)));
    h += &route_matching("ontraport", "note_forward", r#"match = [{ pointer = "/contact_id", exists = true }]"#);
    env_from_example("ontraport", &h)
}

/// Posts an example body as `send.sh` does (`post_form FILE`): token percent-encoded in the URL.
fn ontraport_send(d: &Daemon, file: &str) -> String {
    d.request("POST", &format!("/hooks/ontraport?token={}", urlencode_all(ONTRAPORT_TOKEN)))
        .header("Content-Type", "application/x-www-form-urlencoded")
        .body(example("ontraport", file))
        .send()
        .id()
}

fn assert_ontraport_stored(ev: &Value, file: &str) {
    assert_stored_as_sent(ev, "ontraport", "POST", "application/x-www-form-urlencoded", &example("ontraport", file));
    assert_eq!(ev["query"], "token=[redacted]", "{ev:#}");
    assert!(!ev.to_string().contains(&urlencode_all(ONTRAPORT_TOKEN)), "the token is stored nowhere: {ev:#}");
}

#[test]
fn ontraport_contact_example_reaches_the_crm_with_the_url_token_redacted() {
    let crm = FakePeer::start(|req, _| hubspot_ok(req));
    let env = ontraport_env(&crm);
    let d = env.daemon().env("ONTRAPORT_TOKEN", ONTRAPORT_TOKEN).env("HUBSPOT_TOKEN", HUBSPOT_TOKEN).start();
    let id = ontraport_send(&d, "contact.txt");

    let (ev, output) = settled_with_one_success(&env, &id, "crm");
    assert_ontraport_stored(&ev, "contact.txt");
    assert_eq!(ev["payload"], json!({"First_Name": "Daniel", "Email": "dgolden@mid-corp.com"}), "labels as written, token left out");
    assert!(output.starts_with("hubspot: 1 record(s) selected, 1 to send, 1 request(s) sent"), "{output}");
    assert_eq!(
        one_hubspot_request(&crm),
        json!({"inputs": [{
            "idProperty": "email",
            "id": "dgolden@mid-corp.com",
            "properties": {"email": "dgolden@mid-corp.com", "firstname": "Daniel"}
        }]})
    );
}

#[test]
fn ontraport_note_example_is_stored_as_received_and_forwarded_byte_exact() {
    let peer = FakePeer::start(|_, _| PeerReply::new(200, "ok"));
    let env = ontraport_env(&peer);
    let d = env.daemon().env("ONTRAPORT_TOKEN", ONTRAPORT_TOKEN).env("HUBSPOT_TOKEN", HUBSPOT_TOKEN).start();
    let id = ontraport_send(&d, "note.txt");

    let (ev, _) = settled_with_one_success(&env, &id, "note_forward");
    assert_ontraport_stored(&ev, "note.txt");
    // Post Data is stored as received, credentials included (README: only headers and query are redacted).
    assert_eq!(
        ev["payload"],
        json!({
            "Api-Appid": "1_111111_111111111",
            "Api-Key": "22222222222222",
            "id": "0",
            "data": "Note inserted by webhook using new API.",
            "author": "1",
            "contact_id": "12345"
        })
    );

    let got = peer.requests();
    assert_eq!(got.len(), 1, "one forward, no CRM upsert: {got:#?}");
    let req = &got[0];
    assert_eq!((req.method.as_str(), req.path.as_str()), ("POST", NOTE_PATH));
    assert_eq!(req.body, example("ontraport", "note.txt"), "the raw body forwarded byte-exact");
    assert_eq!(req.header("content-type"), Some("application/x-www-form-urlencoded"));
    assert_eq!(req.header("x-hooktrail-event-id"), Some(id.as_str()));
    assert_eq!(req.header("x-hooktrail-source"), Some("ontraport"));
}

// --- Lead Liaison --------------------------------------------------------------------

const LL_TOKEN: &str = "ll-token/+= 77a0";
const LL_FIELDS: &str = r#"fields = { email = "/email", firstname = "/first_name", lastname = "/last_name", company = "/company" }"#;

/// The Lead Liaison example with the two CRM handlers its comments suggest.
fn leadliaison_env(crm: &FakePeer) -> TestEnv {
    let mut h = hubspot_handler("crm", crm, &format!("id_property = \"email\"\n{LL_FIELDS}"));
    h += &route_matching("leadliaison", "crm", "");
    h += &hubspot_handler("crm_xml", crm, &format!("id_property = \"email\"\nrecords = \"/lead\"\n{LL_FIELDS}"));
    h += &route_matching("leadliaison-xml", "crm_xml", "");
    env_from_example("leadliaison", &h)
}

fn leadliaison_daemon(env: &TestEnv) -> Daemon {
    env.daemon().env("LEADLIAISON_TOKEN", LL_TOKEN).env("HUBSPOT_TOKEN", HUBSPOT_TOKEN).start()
}

/// `?token=…` as `send.sh` builds it.
fn ll_token_q() -> String {
    format!("token={}", urlencode_all(LL_TOKEN))
}

/// The answer is the source's response template: the event id, "accepted", the email.
fn ll_answer_id(resp: &Resp) -> String {
    assert_eq!(resp.status, 200, "{:?}", resp.text());
    assert_eq!(resp.header("content-type").as_deref(), Some("application/json"));
    let body = resp.json();
    let id = body["id"].as_str().unwrap_or_else(|| panic!("no id in {body}")).to_string();
    assert!(id.starts_with("evt_"), "{body}");
    assert_eq!(body, json!({"id": id, "status": "accepted", "email": "dgolden@mid-corp.com"}));
    id
}

/// What every Lead Liaison request becomes in HubSpot.
fn assert_daniel_upserted(crm: &FakePeer, output: &str) {
    assert!(output.starts_with("hubspot: 1 record(s) selected, 1 to send, 1 request(s) sent"), "{output}");
    assert_eq!(
        one_hubspot_request(crm),
        json!({"inputs": [{
            "idProperty": "email",
            "id": "dgolden@mid-corp.com",
            "properties": {"email": "dgolden@mid-corp.com", "firstname": "Daniel", "lastname": "Golden", "company": "MidSize Corp"}
        }]})
    );
}

fn daniel_flat() -> Value {
    json!({"first_name": "Daniel", "last_name": "Golden", "email": "dgolden@mid-corp.com", "company": "MidSize Corp"})
}

fn assert_ll_token_hidden(ev: &Value) {
    assert!(!ev.to_string().contains(&urlencode_all(LL_TOKEN)), "the token is stored nowhere: {ev:#}");
}

/// Posts `examples/leadliaison/FILE` as `send.sh` does to `/hooks/SOURCE`
/// and checks the answer, the stored event (the token redacted everywhere,
/// the payload `payload`) and the one HubSpot upsert made by `handler`.
fn leadliaison_post_reaches_the_crm(file: &str, source: &str, content_type: &str, handler: &str, payload: Value) {
    let crm = FakePeer::start(|req, _| hubspot_ok(req));
    let env = leadliaison_env(&crm);
    let d = leadliaison_daemon(&env);
    let body = example("leadliaison", file);
    let resp =
        d.request("POST", &format!("/hooks/{source}?{}", ll_token_q())).header("Content-Type", content_type).body(body.clone()).send();
    let id = ll_answer_id(&resp);

    let (ev, output) = settled_with_one_success(&env, &id, handler);
    assert_stored_as_sent(&ev, source, "POST", content_type, &body);
    assert_eq!(ev["payload"], payload, "{file}");
    assert_eq!(ev["query"], "token=[redacted]");
    assert_ll_token_hidden(&ev);
    assert_daniel_upserted(&crm, &output);
}

#[test]
fn leadliaison_form_example_answers_the_response_template_and_reaches_the_crm() {
    // Form fields at the top, `+` decoded as a space.
    leadliaison_post_reaches_the_crm("form.txt", "leadliaison", "application/x-www-form-urlencoded", "crm", daniel_flat());
}

#[test]
fn leadliaison_json_example_answers_the_response_template_and_reaches_the_crm() {
    leadliaison_post_reaches_the_crm("lead.json", "leadliaison", "application/json", "crm", daniel_flat());
}

#[test]
fn leadliaison_xml_example_answers_from_under_its_root_and_reaches_the_crm() {
    // The root element is the top key; the handler's `records = "/lead"` reaches under it.
    leadliaison_post_reaches_the_crm("lead.xml", "leadliaison-xml", "application/xml", "crm_xml", json!({"lead": daniel_flat()}));
}

#[test]
fn leadliaison_get_ping_example_answers_the_response_template_and_reaches_the_crm() {
    let crm = FakePeer::start(|req, _| hubspot_ok(req));
    let env = leadliaison_env(&crm);
    let d = leadliaison_daemon(&env);
    // The query string of send.sh's `get`, after the token.
    let fields = "first_name=Daniel&last_name=Golden&email=dgolden%40mid-corp.com&company=MidSize%20Corp";
    let resp = d.get(&format!("/hooks/leadliaison?{}&{fields}", ll_token_q()));
    let id = ll_answer_id(&resp);

    let (ev, output) = settled_with_one_success(&env, &id, "crm");
    assert_eq!(ev["method"], "GET", "{ev:#}");
    assert_eq!(ev["body_bytes"], 0, "{ev:#}");
    assert_eq!(ev["query"], format!("token=[redacted]&{fields}"), "query stored as sent, token redacted");
    assert_eq!(ev["payload"], daniel_flat(), "the query fields without the token");
    assert_ll_token_hidden(&ev);
    assert_daniel_upserted(&crm, &output);
}

/// Guards the tests above against drifting from the examples: every request
/// they make is one `send.sh` makes (same files, content types, paths).
#[test]
fn each_send_script_still_sends_what_these_tests_send() {
    let expect = [
        (
            "netresults",
            &[
                "Content-Type: application/json",
                "X-Webhook-Token: $NR_TOKEN",
                "/hooks/netresults",
                "post_json form.json",
                "post_json campaign.json",
                "post_json alert.json",
            ][..],
        ),
        (
            "email-platform",
            &["Content-Type: application/json", "X-Api-Key: $EMAIL_WEBHOOK_TOKEN", "/hooks/email-platform", "@test-event.json"][..],
        ),
        (
            "ontraport",
            &[
                "Content-Type: application/x-www-form-urlencoded",
                "/hooks/ontraport",
                "?token=$(urlencode",
                "post_form contact.txt",
                "post_form note.txt",
            ][..],
        ),
        (
            "leadliaison",
            &[
                "Content-Type: application/x-www-form-urlencoded' \\\n        --data-binary @form.txt",
                "Content-Type: application/json' \\\n        --data-binary @lead.json",
                "/hooks/leadliaison-xml?$TOKEN_Q\" \\\n        -H 'Content-Type: application/xml' \\\n        --data-binary @lead.xml",
                "/hooks/leadliaison?$TOKEN_Q&first_name=Daniel&last_name=Golden&email=dgolden%40mid-corp.com&company=MidSize%20Corp\"",
            ][..],
        ),
    ];
    for (dir, needles) in expect {
        let script = example_text(dir, "send.sh");
        for n in needles {
            assert!(script.contains(n), "examples/{dir}/send.sh no longer contains {n:?}; update tests/seeds.rs to match it");
        }
    }
}
