//! The crm_upsert handler through the real binary (README, "CRM upsert handler"; issue 6): a fake
//! CRM on loopback speaks HubSpot's batch upsert and Salesforce's sObject
//! upsert and records every request, and each test checks both what the CRM
//! received and what `events show --json` recorded for the delivery.

mod common;

use std::collections::BTreeSet;
use std::time::Duration;

use common::*;
use serde_json::{json, Value};

const HUBSPOT_TOKEN: &str = "pat-na1-test-0000-crm";
const SF_TOKEN: &str = "00Dxx0000001gPL!AQ4AQFake";

/// Fast polling and retries (3 attempts), an open source, and a route to handler `crm`.
fn fast() -> String {
    [fast_retries(3, "500ms", ""), open_source("netresults"), route("netresults", "crm")].concat()
}

/// The form fields of the Net-Results form webhook, mapped to HubSpot properties.
const HUBSPOT_FORM_FIELDS: &str = r#"fields = { email = "/submission_values/email_address/0", firstname = "/submission_values/first_name/0", lastname = "/submission_values/last_name/0", company = "/submission_values/company_name/0" }"#;

/// A config with `[handlers.crm]` made of `keys`.
fn env_with(keys: &str) -> TestEnv {
    TestEnv::new(&format!("{}\n[handlers.crm]\ntype = \"crm_upsert\"\n{keys}\n", fast()))
}

/// A daemon whose handler `crm` is HubSpot at `peer` with `extra` keys, its token set.
fn start_hubspot(peer: &FakePeer, extra: &str) -> (TestEnv, Daemon) {
    let env = env_with(&format!("provider = \"hubspot\"\nbase_url = {}\ntoken_env = \"HUBSPOT_TOKEN\"\n{extra}", toml_str(&peer.url(""))));
    let d = env.daemon().env("HUBSPOT_TOKEN", HUBSPOT_TOKEN).start();
    (env, d)
}

fn post(d: &Daemon, body: &str) -> String {
    d.post_json("/hooks/netresults", body).id()
}

/// The ids of every input of every HubSpot request.
fn hubspot_ids(requests: &[PeerRequest]) -> Vec<String> {
    requests
        .iter()
        .flat_map(|r| r.json()["inputs"].as_array().cloned().unwrap_or_default())
        .map(|i| i["id"].as_str().unwrap_or_else(|| panic!("input without a string id: {i}")).to_string())
        .collect()
}

#[test]
fn form_webhook_becomes_one_hubspot_upsert_with_mapped_properties_and_bearer_token() {
    let crm = FakePeer::start(|req, _| hubspot_ok(req));
    let (env, d) = start_hubspot(&crm, HUBSPOT_FORM_FIELDS);
    let id = post(&d, seeds::NETRESULTS_FORM);

    let ev = wait_settled(&env, &id);
    let del = delivery(&ev, "crm");
    assert_eq!(del["status"], "succeeded", "{ev:#}");
    let tries = attempts(del);
    assert_eq!(tries.len(), 1, "{del:#}");
    assert_eq!(tries[0]["outcome"], "success");
    assert_eq!(tries[0]["http_status"], 200);
    let output = tries[0]["output"].as_str().unwrap_or_default();
    assert!(output.starts_with("hubspot: 1 record(s) selected, 1 to send, 1 request(s) sent"), "{output}");

    let got = crm.requests();
    assert_eq!(got.len(), 1, "{got:#?}");
    let req = &got[0];
    assert_eq!((req.method.as_str(), req.path.as_str()), ("POST", HUBSPOT_PATH));
    assert_eq!(req.header("authorization"), Some(format!("Bearer {HUBSPOT_TOKEN}").as_str()));
    assert!(req.header("content-type").is_some_and(|ct| ct.starts_with("application/json")), "{req:?}");
    assert_eq!(
        req.json(),
        json!({"inputs": [{
            "idProperty": "email",
            "id": "dgolden@mid-corp.com",
            "properties": {"email": "dgolden@mid-corp.com", "firstname": "Daniel", "lastname": "Golden", "company": "MidSize Corp"}
        }]})
    );
    assert!(!env.log().contains(HUBSPOT_TOKEN), "the CRM token reached the log");
}

/// The seed campaign webhook with `n` contact ids spread over two timestamps.
fn campaign_with(ids: &[u64]) -> Value {
    let mut payload: Value = serde_json::from_str(seeds::NETRESULTS_CAMPAIGN).expect("the seed is JSON");
    let (a, b) = ids.split_at(ids.len() / 2);
    let contacts =
        payload.pointer_mut("/CampaignActionQualification/0/Campaign/0/CampaignAction/0/Contacts").expect("the seed has a Contacts object");
    *contacts = json!({"2019-08-02T15:45:22+00:00": a, "2019-08-02T16:00:00+00:00": b});
    payload
}

#[test]
fn campaign_webhook_with_250_contacts_and_batch_size_100_sends_3_requests_with_every_id_once() {
    let crm = FakePeer::start(|req, _| hubspot_ok(req));
    let (env, d) = start_hubspot(
        &crm,
        r#"records = "/CampaignActionQualification/*/Campaign/*/CampaignAction/*/Contacts/*/*"
id_property = "netresults_id"
fields = { netresults_id = "" }
batch_size = 100"#,
    );
    let ids: Vec<u64> = (0..250).map(|i| 1_234_567 + i * 7).collect();
    let id = post(&d, &campaign_with(&ids).to_string());

    let ev = wait_settled(&env, &id);
    let del = delivery(&ev, "crm");
    assert_eq!(del["status"], "succeeded", "{ev:#}");
    assert_eq!(attempts(del).len(), 1);
    let output = attempts(del)[0]["output"].as_str().unwrap_or_default().to_string();
    assert!(output.starts_with("hubspot: 250 record(s) selected, 250 to send, 3 request(s) sent"), "{output}");

    let got = crm.requests_to(HUBSPOT_PATH);
    assert_eq!(got.len(), 3, "exactly 3 batch requests, got {}", got.len());
    let sizes: Vec<usize> = got.iter().map(|r| r.json()["inputs"].as_array().map_or(0, Vec::len)).collect();
    assert_eq!(sizes, [100, 100, 50]);
    let sent = hubspot_ids(&got);
    assert_eq!(sent.len(), 250, "no id sent twice");
    let want: BTreeSet<String> = ids.iter().map(u64::to_string).collect();
    assert_eq!(sent.iter().cloned().collect::<BTreeSet<_>>(), want, "every id sent");
    // A bare contact id became a record through the empty pointer, as HubSpot's string.
    let first = &got[0].json()["inputs"][0];
    assert_eq!(first["idProperty"], "netresults_id");
    assert_eq!(first["properties"], json!({"netresults_id": first["id"]}));
}

#[test]
fn crm_429_with_retry_after_is_retried_after_the_pause_and_succeeds() {
    let crm = FakePeer::start(|req, n| {
        if n == 1 {
            PeerReply::json(429, &json!({"status": "error", "message": "You have reached your secondly limit.", "category": "RATE_LIMITS"}))
                .header("retry-after", "1")
        } else {
            hubspot_ok(req)
        }
    });
    let (env, d) = start_hubspot(&crm, HUBSPOT_FORM_FIELDS);
    let id = post(&d, seeds::NETRESULTS_FORM);

    let ev = wait_settled(&env, &id);
    let del = delivery(&ev, "crm");
    assert_eq!(del["status"], "succeeded", "{ev:#}");
    let tries = attempts(del);
    assert_eq!(tries.len(), 2, "{del:#}");
    assert_eq!((&tries[0]["outcome"], &tries[0]["http_status"]), (&json!("retry"), &json!(429)));
    // The status is in http_status, not repeated in the error (the CRM's
    // address, whose port may hold "429", is left out of the check).
    let error = tries[0]["error"].as_str().unwrap_or_default().replace(crm.url("").trim_start_matches("http://"), "");
    assert!(error.starts_with("request 1/1") && !error.contains("429"), "{:#}", tries[0]);
    let first_output = tries[0]["output"].as_str().unwrap_or_default();
    assert!(first_output.contains("Retry-After 1s") && first_output.contains("secondly limit"), "{first_output}");
    assert_eq!((&tries[1]["outcome"], &tries[1]["http_status"]), (&json!("success"), &json!(200)));

    let got = crm.requests();
    assert_eq!(got.len(), 2);
    let pause = got[1].at - got[0].at;
    assert!(pause >= Duration::from_secs(1), "Retry-After: 1 honoured (backoff alone is 100 ms), waited {pause:?}");
    assert_eq!(got[0].body, got[1].body, "the retry re-sends the same batch");
}

#[test]
fn record_without_email_is_skipped_and_reported_while_the_others_are_sent() {
    let crm = FakePeer::start(|req, _| hubspot_ok(req));
    let (env, d) = start_hubspot(&crm, "records = \"/leads/*\"\nfields = { email = \"/email\", firstname = \"/first\" }");
    let body = json!({"leads": [
        {"email": "ada@example.com", "first": "Ada"},
        {"first": "No Mail"},
        {"email": "grace@example.com", "first": "Grace"},
    ]});
    let id = post(&d, &body.to_string());

    let ev = wait_settled(&env, &id);
    let del = delivery(&ev, "crm");
    assert_eq!(del["status"], "succeeded", "only sent records count: {ev:#}");
    let output = attempts(del)[0]["output"].as_str().unwrap_or_default();
    assert!(output.contains("3 record(s) selected, 2 to send, 1 request(s) sent, 1 skipped"), "{output}");
    assert!(output.contains("skipped /leads/1: no `email`"), "{output}");

    let got = crm.requests();
    assert_eq!(got.len(), 1);
    assert_eq!(hubspot_ids(&got), ["ada@example.com", "grace@example.com"]);
    assert_eq!(got[0].json()["inputs"][1]["properties"], json!({"email": "grace@example.com", "firstname": "Grace"}));
}

#[test]
fn hubspot_multi_status_errors_fail_the_delivery_and_are_recorded() {
    let crm = FakePeer::start(|_, _| {
        PeerReply::json(
            207,
            &json!({"status": "COMPLETE", "results": [], "numErrors": 1, "errors": [{
                "status": "error", "category": "VALIDATION_ERROR",
                "message": "Property values were not valid", "context": {"ids": ["dgolden@mid-corp.com"]}
            }]}),
        )
    });
    let (env, d) = start_hubspot(&crm, HUBSPOT_FORM_FIELDS);
    let id = post(&d, seeds::NETRESULTS_FORM);

    let ev = wait_settled(&env, &id);
    let del = delivery(&ev, "crm");
    assert_eq!(del["status"], "failed", "a rejected record is not retried: {ev:#}");
    let tries = attempts(del);
    assert_eq!(tries.len(), 1);
    assert_eq!((&tries[0]["outcome"], &tries[0]["http_status"]), (&json!("failure"), &json!(207)));
    assert!(tries[0]["error"].as_str().is_some_and(|e| e.contains("HubSpot rejected 1 of 1 record(s)")), "{:#}", tries[0]);
    let output = tries[0]["output"].as_str().unwrap_or_default();
    assert!(output.contains("VALIDATION_ERROR: Property values were not valid"), "{output}");
}

/// A daemon whose handler `crm` is Salesforce at `peer` (contacts by email), its token set.
fn start_salesforce(peer: &FakePeer) -> (TestEnv, Daemon) {
    let env = env_with(&format!(
        r#"provider = "salesforce"
base_url = {}
token_env = "SF_TOKEN"
id_property = "Email"
fields = {{ Email = "/submission_values/email_address/0", FirstName = "/submission_values/first_name/0", LastName = "/submission_values/last_name/0", Netresults_Id__c = "/contact_id" }}"#,
        toml_str(&peer.url(""))
    ));
    let d = env.daemon().env("SF_TOKEN", SF_TOKEN).start();
    (env, d)
}

#[test]
fn salesforce_patches_each_record_by_its_encoded_external_id_without_the_id_in_the_body() {
    let crm =
        FakePeer::start(|_, _| PeerReply::json(201, &json!({"id": "003Dn00000ABCDEF", "success": true, "errors": [], "created": true})));
    let (env, d) = start_salesforce(&crm);
    let id = post(&d, seeds::NETRESULTS_FORM);

    let ev = wait_settled(&env, &id);
    let del = delivery(&ev, "crm");
    assert_eq!(del["status"], "succeeded", "{ev:#}");
    assert_eq!(attempts(del)[0]["http_status"], 201);

    let got = crm.requests();
    assert_eq!(got.len(), 1, "{got:#?}");
    let req = &got[0];
    assert_eq!(req.method, "PATCH");
    assert_eq!(req.path, "/services/data/v60.0/sobjects/Contact/Email/dgolden%40mid-corp.com");
    assert_eq!(req.header("authorization"), Some(format!("Bearer {SF_TOKEN}").as_str()));
    assert_eq!(req.json(), json!({"FirstName": "Daniel", "LastName": "Golden", "Netresults_Id__c": "749746728"}));
}

#[test]
fn salesforce_error_array_fails_the_delivery_without_retry_and_is_recorded() {
    let crm = FakePeer::start(|_, _| {
        PeerReply::json(
            400,
            &json!([{"message": "Required fields are missing: [LastName]", "errorCode": "REQUIRED_FIELD_MISSING", "fields": ["LastName"]}]),
        )
    });
    let (env, d) = start_salesforce(&crm);
    let id = post(&d, seeds::NETRESULTS_FORM);

    let ev = wait_settled(&env, &id);
    let del = delivery(&ev, "crm");
    assert_eq!(del["status"], "failed", "{ev:#}");
    let tries = attempts(del);
    assert_eq!(tries.len(), 1, "a 400 is not retried: {del:#}");
    assert_eq!(tries[0]["http_status"], 400);
    let output = tries[0]["output"].as_str().unwrap_or_default();
    assert!(output.contains("REQUIRED_FIELD_MISSING: Required fields are missing: [LastName] (fields: LastName)"), "{output}");
    assert_eq!(crm.requests().len(), 1);
}

#[test]
fn http_provider_renders_its_url_and_body_templates_with_configured_headers() {
    let crm = FakePeer::start(|_, _| PeerReply::json(200, &json!({"ok": true})));
    let env = env_with(&format!(
        r#"provider = "http"
method = "POST"
url_template = {}
body_template = '{{"contact":{{"email":"{{{{email}}}}","name":"{{{{firstname}}}} {{{{lastname}}}}"}},"event":"{{{{event_id}}}}"}}'
headers = {{ X-Api-Key = "${{CRM_KEY}}" }}
fields = {{ email = "/submission_values/email_address/0", firstname = "/submission_values/first_name/0", lastname = "/submission_values/last_name/0" }}"#,
        toml_str(&crm.url("/api/contacts/{id}?source=hooktrail"))
    ));
    let d = env.daemon().env("CRM_KEY", "k-123").start();
    let id = post(&d, seeds::NETRESULTS_FORM);

    let ev = wait_settled(&env, &id);
    assert_eq!(delivery(&ev, "crm")["status"], "succeeded", "{ev:#}");
    let got = crm.requests();
    assert_eq!(got.len(), 1, "{got:#?}");
    let req = &got[0];
    assert_eq!(req.method, "POST");
    assert_eq!(req.path, "/api/contacts/dgolden%40mid-corp.com?source=hooktrail");
    assert_eq!(req.header("x-api-key"), Some("k-123"));
    assert_eq!(req.header("authorization"), None, "no token_env, no bearer token");
    assert_eq!(req.header("x-hooktrail-event-id"), Some(id.as_str()));
    assert_eq!(req.json(), json!({"contact": {"email": "dgolden@mid-corp.com", "name": "Daniel Golden"}, "event": id}));
}

#[test]
fn check_config_names_crm_problems_with_their_key_paths() {
    let env = TestEnv::new(
        r#"
[handlers.hub]
type = "crm_upsert"
provider = "hubspot"
token_env = "HUBSPOT_TOKEN"
fields = { email = "/email" }
batch_size = 500
url_template = "https://ignored.example.com/{id}"

[handlers.api]
type = "crm_upsert"
provider = "http"
method = "NOT A METHOD"
url_template = "crm.example.com/contacts/{id}"
fields = { email = "email" }
"#,
    );
    let mut c = env.command(&["check-config"]);
    c.env("HUBSPOT_TOKEN", "pat-ok");
    let out = run(c);
    assert_eq!(out.code, 1, "{out:?}");
    for line in [
        "error: handlers.hub.batch_size: 500 is more than HubSpot accepts in one batch (100)",
        "error: handlers.api.method: `NOT A METHOD` is not an HTTP method",
        "error: handlers.api.url_template: `crm.example.com/contacts/id` is not an http:// or https:// URL",
        "error: handlers.api.fields.email: `email` is not a JSON pointer",
    ] {
        assert!(out.stdout.lines().any(|l| l.starts_with(line)), "missing {line:?} in:\n{}", out.stdout);
    }
    let ignored = "warning: handlers.hub.url_template: is used only with provider = \"http\"; ignored";
    assert!(out.stdout.contains(ignored), "missing {ignored:?} in:\n{}", out.stdout);
}

#[test]
fn salesforce_chunk_with_a_503_stops_the_attempt_and_the_retry_resends_every_record() {
    // Five contact ids in chunks of 2: [a, b] [c, d] [e]; `d` answers 503 once.
    let ids: Vec<u64> = (0..5).map(|i| 1_234_567 + i).collect();
    let flaky = format!("/services/data/v60.0/sobjects/Contact/Netresults_Id__c/{}", ids[3]);
    let crm = FakePeer::start(move |req, n| {
        if req.path == flaky && n == 1 {
            PeerReply::json(503, &json!([{"message": "Server unavailable", "errorCode": "SERVER_UNAVAILABLE"}]))
        } else {
            PeerReply::json(200, &json!({"id": "003Dn00000ABCDEF", "success": true, "errors": [], "created": false}))
        }
    });
    let env = env_with(&format!(
        r#"provider = "salesforce"
base_url = {}
token_env = "SF_TOKEN"
records = "/CampaignActionQualification/*/Campaign/*/CampaignAction/*/Contacts/*/*"
id_property = "Netresults_Id__c"
fields = {{ Netresults_Id__c = "" }}
batch_size = 2"#,
        toml_str(&crm.url(""))
    ));
    let d = env.daemon().env("SF_TOKEN", SF_TOKEN).start();
    let id = post(&d, &campaign_with(&ids).to_string());

    let ev = wait_settled(&env, &id);
    let del = delivery(&ev, "crm");
    assert_eq!(del["status"], "succeeded", "{ev:#}");
    let tries = attempts(del);
    assert_eq!(tries.len(), 2, "{del:#}");
    assert_eq!((&tries[0]["outcome"], &tries[0]["http_status"]), (&json!("retry"), &json!(503)));
    let first = tries[0]["output"].as_str().unwrap_or_default();
    assert!(first.starts_with("salesforce: 5 record(s) selected, 5 to send, 4 request(s) sent"), "{first}");
    assert!(first.contains("SERVER_UNAVAILABLE: Server unavailable"), "{first}");
    assert!(first.contains("not sent: 1 record(s); the next attempt sends every record again"), "{first}");
    assert_eq!(tries[1]["outcome"], "success");

    let got = crm.requests();
    assert!(got.iter().all(|r| r.method == "PATCH" && r.json() == json!({})), "the id is only in the URL: {got:#?}");
    let sent: Vec<String> = got.iter().map(|r| r.path.rsplit('/').next().unwrap_or_default().to_string()).collect();
    let want: Vec<String> = ids.iter().map(u64::to_string).collect();
    let mut first_attempt = sent[..4].to_vec();
    first_attempt.sort();
    assert_eq!(first_attempt, want[..4], "the first attempt stopped after the chunk with the 503");
    let mut retry = sent[4..].to_vec();
    retry.sort();
    assert_eq!(retry, want, "the retry sent every record again, the one never sent included");
}

#[test]
fn ids_that_are_dot_segments_are_skipped_and_every_other_id_stays_one_path_segment() {
    // Issue 11 item 3: `{id}` = `..` made `/api/contacts/..` reach `/api/` with the bearer token.
    const TOKEN: &str = "crm-token-7d41c0ffee";
    let crm = FakePeer::start(|_, _| PeerReply::json(200, &json!({"ok": true})));
    let env = env_with(&format!(
        "provider = \"http\"\nurl_template = {}\ntoken_env = \"CRM_TOKEN\"\nrecords = \"/people/*\"\nfields = {{ email = \"/email\", name = \"/name\" }}",
        toml_str(&crm.url("/api/contacts/{id}"))
    ));
    let d = env.daemon().env("CRM_TOKEN", TOKEN).start();
    let body = json!({"people": [
        {"email": "..", "name": "up one"},
        {"email": "a/b", "name": "slash"},
        {"email": ".", "name": "here"},
        {"email": "", "name": "empty"},
        {"email": "%2e%2e", "name": "encoded dots stay text"},
    ]});
    let id = post(&d, &body.to_string());

    let ev = wait_settled(&env, &id);
    let del = delivery(&ev, "crm");
    assert_eq!(del["status"], "succeeded", "every record that was sent succeeded: {ev:#}");
    let got = crm.requests();
    let mut paths: Vec<(&str, &str)> = got.iter().map(|r| (r.method.as_str(), r.path.as_str())).collect();
    paths.sort();
    assert_eq!(paths, [("PUT", "/api/contacts/%252e%252e"), ("PUT", "/api/contacts/a%2Fb")], "nothing reached another path: {got:#?}");

    let output = attempts(del)[0]["output"].as_str().unwrap_or_default();
    assert!(output.starts_with("http: 5 record(s) selected, 2 to send, 2 request(s) sent, 3 skipped"), "{output}");
    for line in [
        "skipped /people/0: `email` is `..`, which a URL reads as a step along the path, not as an id",
        "skipped /people/2: `email` is `.`, which a URL reads as a step along the path, not as an id",
        "skipped /people/3: `email` is empty",
    ] {
        assert!(output.lines().any(|l| l == line), "missing {line:?} in:\n{output}");
    }
    // The output names the URL each record went to (and never the token).
    let called = format!("success record `email` = a/b to PUT {}: HTTP 200", crm.url("/api/contacts/a%2Fb"));
    assert!(output.lines().any(|l| l == called), "missing {called:?} in:\n{output}");
    assert!(!output.contains(TOKEN) && !env.log().contains(TOKEN), "the token leaked: {output}");
}
