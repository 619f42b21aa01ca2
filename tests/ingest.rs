//! Durable ingest through the real binary (issue 3; README, "Receiving"): every sender in
//! the seeds accepted and normalized as the contract says, every error status
//! with its message and nothing stored, dedup, secrets kept out of storage and
//! logs, and response templates.

mod common;

use std::io::Write as _;
use std::time::Duration;

use base64::Engine as _;
use common::*;
use serde_json::{json, Value};

fn parse(s: &str) -> Value {
    serde_json::from_str(s).expect("test JSON is valid")
}

/// [`assert_status`], and the error body says it is JSON.
fn assert_error(r: &Resp, status: u16, needle: &str) {
    assert_status(r, status, needle);
    assert_eq!(r.header("content-type").as_deref(), Some("application/json"), "error bodies are JSON");
}

// ---------------------------------------------------------------------------
// Senders from the seeds
// ---------------------------------------------------------------------------

#[test]
fn netresults_form_and_campaign_webhooks_are_stored_exactly_with_their_json() {
    let env = TestEnv::new(
        r#"
[sources.netresults]
auth = { type = "header_token", header = "X-Webhook-Token", secret_env = "NR_TOKEN" }
"#,
    );
    let d = env.daemon().env("NR_TOKEN", "nr-token-4f9a").start();
    let mut ids = Vec::new();
    for body in [seeds::NETRESULTS_FORM, seeds::NETRESULTS_CAMPAIGN] {
        let r = d
            .request("POST", "/hooks/netresults")
            .header("content-type", "application/json")
            .header("x-webhook-token", "nr-token-4f9a")
            .body(body)
            .send();
        let id = r.id();
        assert_eq!(r.json(), json!({"id": id, "status": "accepted"}));
        assert!(id.starts_with("evt_") && id.len() == 30, "event ids look like evt_<ULID>: {id}");
        assert!(id.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_'), "event ids are URL-safe: {id}");

        let ev = env.show(&id);
        assert_eq!(ev["id"], id);
        assert_eq!(ev["source"], "netresults");
        assert_eq!(ev["method"], "POST");
        assert_eq!(ev["content_type"], "application/json");
        assert_eq!(ev["query"], "");
        assert_eq!(ev["remote_addr"], "127.0.0.1");
        assert_eq!(ev["body"], body, "raw body kept byte for byte");
        assert!(ev.get("body_base64").is_none(), "a UTF-8 body is shown as text");
        assert_eq!(ev["payload"], parse(body), "JSON is normalized as sent");
        assert_eq!(ev["headers"]["x-webhook-token"], "[redacted]");
        assert_eq!(ev["headers"]["content-type"], "application/json");
        assert_eq!(ev["status"], "done", "nothing is routed, so the event is done");
        assert_eq!(ev["deliveries"], json!([]));
        let received = ev["received_at"].as_str().expect("received_at is a string");
        chrono::DateTime::parse_from_rfc3339(received).expect("received_at is RFC 3339");
        ids.push(id);
    }
    assert!(ids[0] < ids[1], "ids sort by receive time: {ids:?}");
    let listed: Vec<Value> = env.events().iter().map(|e| e["id"].clone()).collect();
    assert_eq!(listed, vec![json!(ids[1]), json!(ids[0])], "events list is newest first");
}

#[test]
fn email_platform_test_event_with_bearer_token_is_accepted() {
    let env = TestEnv::new(
        r#"
[sources.email]
auth = { type = "header_token", header = "Authorization", secret_env = "EMAIL_TOKEN" }
"#,
    );
    let d = env.daemon().env("EMAIL_TOKEN", "em-7c1d").start();
    let r = d
        .request("POST", "/hooks/email")
        .header("content-type", "application/json; charset=utf-8")
        .header("authorization", "Bearer em-7c1d")
        .header("user-agent", "Webhook-Sender/1.0")
        .body(seeds::EMAIL_TEST_EVENT)
        .send();
    let ev = env.show(&r.id());
    assert_eq!(ev["content_type"], "application/json; charset=utf-8");
    assert_eq!(ev["body"], seeds::EMAIL_TEST_EVENT);
    assert_eq!(ev["payload"], parse(seeds::EMAIL_TEST_EVENT));
    assert_eq!(ev["payload"]["data"]["email"], "john.doe@example.org");
    assert_eq!(ev["headers"]["authorization"], "[redacted]");
    assert_eq!(ev["headers"]["user-agent"], "Webhook-Sender/1.0", "ordinary headers are kept");
}

#[test]
fn ontraport_form_post_with_query_token_is_normalized_to_strings() {
    let env = TestEnv::new(
        r#"
[sources.ontraport]
auth = { type = "query_token", param = "token", secret_env = "OP_TOKEN" }
"#,
    );
    let d = env.daemon().env("OP_TOKEN", "op-91b2").start();
    let body = format!("{}&tag=hot&tag=webinar", seeds::ONTRAPORT_FORM);
    let r = d.post("/hooks/ontraport?campaign=42&token=op-91b2", "application/x-www-form-urlencoded", body.clone());
    let ev = env.show(&r.id());
    assert_eq!(ev["body"], body.as_str());
    assert_eq!(ev["content_type"], "application/x-www-form-urlencoded");
    assert_eq!(ev["query"], "campaign=42&token=[redacted]", "the query is kept, its token redacted");
    assert_eq!(
        ev["payload"],
        json!({
            "First_Name": "Daniel",
            "Email": "dgolden@mid-corp.com",
            "address": "2040 Alameda Padre Serra",
            "city": "Santa Barbara",
            "tag": ["hot", "webinar"],
        })
    );
}

#[test]
fn lead_liaison_form_json_xml_and_get_ping_are_normalized() {
    let env = TestEnv::new(
        r#"
[sources.leadliaison]
auth = { type = "basic", username = "ll", secret_env = "LL_PASSWORD" }
"#,
    );
    let d = env.daemon().env("LL_PASSWORD", "ll-pw-5e").start();
    let basic = format!("Basic {}", base64::engine::general_purpose::STANDARD.encode("ll:ll-pw-5e"));
    let send = |method: &str, path: &str, ct: Option<&str>, body: &str| -> Value {
        let mut req = d.request(method, path).header("authorization", &basic);
        if let Some(ct) = ct {
            req = req.header("content-type", ct);
        }
        let r = req.body(body.to_string()).send();
        let ev = env.show(&r.id());
        assert_eq!(ev["method"], method);
        assert_eq!(ev["body"], body);
        assert_eq!(ev["headers"]["authorization"], "[redacted]");
        ev
    };

    let form = send("POST", "/hooks/leadliaison", Some("application/x-www-form-urlencoded"), "first_name=Ann&email=ann%40example.com");
    assert_eq!(form["payload"], json!({"first_name": "Ann", "email": "ann@example.com"}));

    let body = r#"{"first_name":"Ann","email":"ann@example.com","score":87,"tags":["a","b"]}"#;
    let js = send("PUT", "/hooks/leadliaison", Some("application/json"), body);
    assert_eq!(js["payload"], parse(body));

    let xml = r#"<?xml version="1.0" encoding="UTF-8"?>
<lead id="42" source="webinar">
  <first_name>Ann</first_name>
  <email>ann@example.com</email>
  <company>Smith &amp; Co</company>
  <tag>a</tag>
  <tag>b</tag>
  <phone type="mobile">555-0100</phone>
</lead>"#;
    let x = send("POST", "/hooks/leadliaison", Some("application/xml"), xml);
    assert_eq!(
        x["payload"],
        json!({"lead": {
            "@id": "42",
            "@source": "webinar",
            "first_name": "Ann",
            "email": "ann@example.com",
            "company": "Smith & Co",
            "tag": ["a", "b"],
            "phone": {"@type": "mobile", "#text": "555-0100"},
        }})
    );
    let tx = send("POST", "/hooks/leadliaison", Some("text/xml"), "<ping><email>ann@example.com</email></ping>");
    assert_eq!(tx["payload"], json!({"ping": {"email": "ann@example.com"}}));

    let ping = send("GET", "/hooks/leadliaison?email=ann%40example.com&first_name=Ann&list=1&list=2", None, "");
    assert_eq!(ping["query"], "email=ann%40example.com&first_name=Ann&list=1&list=2");
    assert_eq!(ping["content_type"], "");
    assert_eq!(ping["payload"], json!({"email": "ann@example.com", "first_name": "Ann", "list": ["1", "2"]}));
    assert_eq!(env.events().len(), 5);
}

#[test]
fn multipart_text_fields_are_normalized_and_file_parts_stay_in_the_raw_body() {
    let env = TestEnv::new("[sources.forms]\nauth = { type = \"none\" }\n");
    let d = env.start();
    let body = "--XyZ\r\nContent-Disposition: form-data; name=\"email\"\r\n\r\nann@example.com\r\n\
                --XyZ\r\nContent-Disposition: form-data; name=\"tag\"\r\n\r\na\r\n\
                --XyZ\r\nContent-Disposition: form-data; name=\"tag\"\r\n\r\nb\r\n\
                --XyZ\r\nContent-Disposition: form-data; name=\"cv\"; filename=\"cv.txt\"\r\nContent-Type: text/plain\r\n\r\nfile bytes\r\n\
                --XyZ--\r\n";
    let r = d.post("/hooks/forms", "multipart/form-data; boundary=XyZ", body);
    let ev = env.show(&r.id());
    assert_eq!(ev["body"], body);
    assert_eq!(ev["payload"], json!({"email": "ann@example.com", "tag": ["a", "b"]}));
}

#[test]
fn form_and_query_bytes_that_are_not_utf8_are_accepted_lossily_and_kept_byte_exact() {
    let env = TestEnv::new("[sources.forms]\nauth = { type = \"none\" }\n");
    let d = env.start();
    let mut body = b"name=%FFok&email=ann%40example.com&raw=".to_vec();
    body.extend_from_slice(&[0xFF, b'x']);
    let r = d.post("/hooks/forms", "application/x-www-form-urlencoded", body.clone());
    let ev = env.show(&r.id());
    assert!(ev.get("body").is_none(), "a non-UTF-8 body is not shown as text: {ev}");
    let stored = base64::engine::general_purpose::STANDARD.decode(ev["body_base64"].as_str().expect("body_base64")).unwrap();
    assert_eq!(stored, body, "the raw body stays byte-exact");
    assert_eq!(ev["payload"], json!({"name": "\u{FFFD}ok", "email": "ann@example.com", "raw": "\u{FFFD}x"}));

    let ping = env.show(&d.get("/hooks/forms?name=%FE%FFok&n=1").id());
    assert_eq!(ping["query"], "name=%FE%FFok&n=1");
    assert_eq!(ping["payload"], json!({"name": "\u{FFFD}\u{FFFD}ok", "n": "1"}));
}

// ---------------------------------------------------------------------------
// Error statuses: each with its message, nothing stored, counted per source
// ---------------------------------------------------------------------------

#[test]
fn malformed_bodies_get_400_naming_the_problem_and_store_nothing() {
    let env = TestEnv::new("[sources.api]\nauth = { type = \"none\" }\n");
    let d = env.start();

    let r = d.post_json("/hooks/api", "{\n  \"email\": \"a@b.c\",\n  \"name\": \n}");
    assert_error(&r, 400, "invalid JSON");
    assert!(r.error().contains("line 4 column 1"), "the JSON error names line and column: {}", r.error());

    let deep = format!("{}{}", "[".repeat(129), "]".repeat(129));
    assert_error(&d.post_json("/hooks/api", &deep), 400, "deeper than 128");

    let mut bad_utf8 = br#"{"name":""#.to_vec();
    bad_utf8.extend_from_slice(&[0xC3, 0x28]);
    bad_utf8.extend_from_slice(br#""}"#);
    let r = d.post("/hooks/api", "application/json", bad_utf8);
    assert_error(&r, 400, "invalid JSON");

    assert_error(&d.post("/hooks/api", "application/xml", "<lead><email>a@b.c</lead>"), 400, "invalid XML");
    assert_error(&d.post("/hooks/api", "application/xml", "<a/><b/>"), 400, "more than one root");
    assert_error(&d.post_json("/hooks/api", ""), 400, "empty body");
    assert_error(&d.request("POST", "/hooks/api").send(), 400, "query string");

    assert!(env.events().is_empty(), "no malformed request was stored");
    wait_rejected(&env, "api", 7);

    // The boundary: exactly 128 levels is fine.
    let ok = format!("{}{}", "[".repeat(128), "]".repeat(128));
    let id = d.post_json("/hooks/api", &ok).id();
    assert_eq!(env.show(&id)["body"], ok.as_str());
    assert_eq!(env.events().len(), 1);
    assert_eq!(env.stat("api", "received"), 1);
}

#[test]
fn auth_failures_get_401_and_store_nothing() {
    let env = TestEnv::new(
        r#"
[sources.hdr]
auth = { type = "header_token", header = "X-Webhook-Token", secret_env = "HDR_TOKEN" }
[sources.qry]
auth = { type = "query_token", param = "token", secret_env = "QRY_TOKEN" }
[sources.basic]
auth = { type = "basic", username = "sender", secret_env = "BASIC_PW" }
"#,
    );
    let d = env.daemon().env("HDR_TOKEN", "h-good").env("QRY_TOKEN", "q-good").env("BASIC_PW", "b-good").start();
    let b64 = |s: &str| base64::engine::general_purpose::STANDARD.encode(s);
    let post = |path: &str, header: Option<(&str, String)>| {
        let mut req = d.request("POST", path).header("content-type", "application/json");
        if let Some((k, v)) = header {
            req = req.header(k, &v);
        }
        req.body(r#"{"email":"a@b.c"}"#).send()
    };

    assert_error(&post("/hooks/hdr", None), 401, "missing x-webhook-token header");
    assert_error(&post("/hooks/hdr", Some(("x-webhook-token", "h-bad".into()))), 401, "invalid token in x-webhook-token header");
    assert_error(&post("/hooks/qry", None), 401, "missing `token` query parameter");
    assert_error(&post("/hooks/qry?token=q-bad", None), 401, "invalid token in `token` query parameter");
    assert_error(&post("/hooks/basic", None), 401, "missing authorization header");
    assert_error(
        &post("/hooks/basic", Some(("authorization", format!("Basic {}", b64("sender:b-bad"))))),
        401,
        "invalid username or password",
    );
    assert_error(
        &post("/hooks/basic", Some(("authorization", format!("Basic {}", b64("other:b-good"))))),
        401,
        "invalid username or password",
    );
    assert_error(&post("/hooks/basic", Some(("authorization", "Bearer b-good".into()))), 401, "expected Basic credentials");
    for r in [
        post("/hooks/hdr", Some(("x-webhook-token", "h-bad".into()))),
        post("/hooks/qry?token=q-bad", None),
        post("/hooks/basic", Some(("authorization", format!("Basic {}", b64("sender:b-bad"))))),
    ] {
        assert!(!r.text().contains("good"), "an auth error never reveals the secret: {}", r.text());
    }
    assert!(env.events().is_empty(), "no unauthenticated request was stored");
    wait_rejected(&env, "hdr", 3);
    wait_rejected(&env, "qry", 3);
    wait_rejected(&env, "basic", 5);

    // The right credentials get in.
    post("/hooks/hdr", Some(("x-webhook-token", "h-good".into()))).id();
    post("/hooks/qry?token=q-good", None).id();
    post("/hooks/basic", Some(("authorization", format!("Basic {}", b64("sender:b-good"))))).id();
    assert_eq!(env.events().len(), 3);
}

#[test]
fn allow_ips_refuses_other_addresses_and_a_forged_forwarded_for_does_not_get_in() {
    let env = TestEnv::with_server(
        r#"trusted_proxies = ["10.0.0.0/8"]"#,
        r#"
[sources.office]
auth = { type = "none" }
allow_ips = ["127.0.0.0/8"]
[sources.partner]
auth = { type = "none" }
allow_ips = ["203.0.113.7", "10.9.9.9"]
"#,
    );
    let d = env.start();
    let r = d.post_json("/hooks/partner", r#"{"n":1}"#);
    assert_error(&r, 403, "address 127.0.0.1 is not allowed to post to source `partner`");
    // 127.0.0.1 is not a trusted proxy, so its X-Forwarded-For is not believed.
    let forged = d
        .request("POST", "/hooks/partner")
        .header("content-type", "application/json")
        .header("x-forwarded-for", "203.0.113.7")
        .body(r#"{"n":2}"#)
        .send();
    assert_error(&forged, 403, "address 127.0.0.1 is not allowed");
    let forged_proxy = d
        .request("POST", "/hooks/partner")
        .header("content-type", "application/json")
        .header("x-forwarded-for", "203.0.113.7, 10.9.9.9")
        .body(r#"{"n":3}"#)
        .send();
    assert_error(&forged_proxy, 403, "address 127.0.0.1 is not allowed");
    assert!(env.events().is_empty(), "no refused request was stored");
    wait_rejected(&env, "partner", 3);

    let ok = d
        .request("POST", "/hooks/office")
        .header("content-type", "application/json")
        .header("x-forwarded-for", "203.0.113.7")
        .body("{}")
        .send();
    assert_eq!(env.show(&ok.id())["remote_addr"], "127.0.0.1", "an untrusted peer's X-Forwarded-For is ignored");
}

#[test]
fn forwarded_for_from_a_trusted_proxy_names_the_client() {
    let env = TestEnv::with_server(
        r#"trusted_proxies = ["127.0.0.1/32", "10.0.0.0/8"]"#,
        r#"
[sources.partner]
auth = { type = "none" }
allow_ips = ["203.0.113.7"]
"#,
    );
    let d = env.start();
    let r = d
        .request("POST", "/hooks/partner")
        .header("content-type", "application/json")
        .header("x-forwarded-for", "198.51.100.9, 203.0.113.7, 10.1.2.3")
        .body("{}")
        .send();
    let ev = env.show(&r.id());
    assert_eq!(ev["remote_addr"], "203.0.113.7", "right-most untrusted X-Forwarded-For entry");
    let r = d
        .request("POST", "/hooks/partner")
        .header("content-type", "application/json")
        .header("x-forwarded-for", "198.51.100.9")
        .body("{}")
        .send();
    assert_error(&r, 403, "address 198.51.100.9 is not allowed");
}

#[test]
fn unknown_path_gets_404_and_other_methods_get_405() {
    let env = TestEnv::new("[sources.api]\nauth = { type = \"none\" }\n");
    let d = env.start();
    assert_error(&d.post_json("/hooks/nope", "{}"), 404, "no source is configured at /hooks/nope");
    assert_error(&d.post_json("/hooks/api/extra", "{}"), 404, "/hooks/api/extra");
    for method in ["DELETE", "PATCH"] {
        let r = d.request(method, "/hooks/api").header("content-type", "application/json").body("{}").send();
        assert_error(&r, 405, &format!("method {method} is not accepted"));
        assert_eq!(r.header("allow").as_deref(), Some("GET, POST, PUT"));
    }
    assert!(env.events().is_empty());
    wait_rejected(&env, "api", 2);
}

#[test]
fn body_that_stops_or_trickles_gets_408_after_request_timeout() {
    let env = TestEnv::with_server(r#"request_timeout = "1s""#, "[sources.api]\nauth = { type = \"none\" }\n");
    let d = env.start();
    let head = "POST /hooks/api HTTP/1.1\r\nHost: t\r\nContent-Type: application/json\r\nContent-Length: 100\r\n\r\n";

    // Headers and a few bytes, then nothing.
    let mut s = d.connect();
    s.write_all(head.as_bytes()).unwrap();
    s.write_all(br#"{"email":"#).unwrap();
    let r = read_response(&mut s).expect("a 408 answer, not a hang");
    assert_error(&r, 408, "request body not received within 1s");

    // One byte every 100 ms: never idle for long, but never done within 1 s.
    // Only 99 of the 100 declared bytes are ever sent, so it cannot complete.
    let mut s = d.connect();
    s.write_all(head.as_bytes()).unwrap();
    let mut w = s.try_clone().unwrap();
    let trickle = std::thread::spawn(move || {
        for _ in 0..99 {
            if w.write_all(b" ").is_err() {
                return;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    });
    let r = read_response(&mut s).expect("a 408 answer, not a hang");
    assert_error(&r, 408, "request body not received within 1s");
    drop(s);
    trickle.join().unwrap();

    assert!(env.events().is_empty());
    wait_rejected(&env, "api", 2);
}

/// A JSON document of exactly `n` bytes.
#[test]
fn body_of_exactly_max_body_bytes_is_accepted_and_one_more_byte_is_413() {
    let env = TestEnv::with_server("max_body_bytes = 64", "[sources.api]\nauth = { type = \"none\" }\n");
    let d = env.start();
    let exact = json_of_len(64);
    let over = json_of_len(65);
    assert_eq!(exact.len(), 64);

    let id = d.post_json("/hooks/api", &exact).id();
    assert_eq!(env.show(&id)["body"], exact.as_str());
    assert_error(&d.post_json("/hooks/api", &over), 413, "request body exceeds server.max_body_bytes (64 bytes)");

    // Chunked, without Content-Length: the limit is enforced while streaming.
    let r = d.raw(&chunked_request("/hooks/api", &exact, 10));
    let id2 = r.id();
    assert_eq!(env.show(&id2)["body"], exact.as_str());
    assert_error(&d.raw(&chunked_request("/hooks/api", &over, 10)), 413, "exceeds server.max_body_bytes");

    // A declared 10 MB body is refused from the head alone, before any of it is sent.
    let r = d.raw(b"POST /hooks/api HTTP/1.1\r\nHost: t\r\nContent-Type: application/json\r\nContent-Length: 10000000\r\n\r\n");
    assert_error(&r, 413, "exceeds server.max_body_bytes");

    assert_eq!(env.events().len(), 2, "only the two bodies within the limit were stored");
    wait_rejected(&env, "api", 3);
}

#[test]
fn unsupported_content_type_gets_415_unless_the_source_accepts_any() {
    let env = TestEnv::new(
        r#"
[sources.api]
auth = { type = "none" }
[sources.anything]
auth = { type = "none" }
accept_any = true
"#,
    );
    let d = env.start();
    assert_error(&d.post("/hooks/api", "text/plain", "hello"), 415, "content type `text/plain` is not accepted");
    assert_error(&d.post("/hooks/api", "application/octet-stream", vec![0u8, 1, 2]), 415, "application/octet-stream");
    let no_type = d.request("POST", "/hooks/api").body("email=a@b.c").send();
    assert_error(&no_type, 415, "missing Content-Type");
    assert!(env.events().is_empty());
    wait_rejected(&env, "api", 3);

    let ev = env.show(&d.post("/hooks/anything", "text/plain", "hello").id());
    assert_eq!(ev["content_type"], "text/plain");
    assert_eq!(ev["body"], "hello");
    assert_eq!(ev["payload"], Value::Null, "an unknown type is stored raw with a null payload");
}

#[test]
fn rate_limited_source_gets_429_with_retry_after_and_stores_only_what_it_accepted() {
    let env = TestEnv::new(
        r#"
[sources.limited]
auth = { type = "none" }
rate_limit = { per_second = 1, burst = 1 }
"#,
    );
    let d = env.start();
    let mut accepted = 0;
    let mut limited = Vec::new();
    // At one per second with a burst of one, back-to-back requests are limited
    // long before twenty of them go by, however slow the machine.
    for i in 0..20 {
        let r = d.post_json("/hooks/limited", &format!(r#"{{"n":{i}}}"#));
        match r.status {
            200 => accepted += 1,
            429 => limited.push(r),
            other => panic!("unexpected {other} {:?}", r.text()),
        }
        if limited.len() >= 3 {
            break;
        }
    }
    assert!(!limited.is_empty(), "no request was rate limited");
    for r in &limited {
        assert_error(r, 429, "rate limit of source `limited` exceeded");
        let retry: u64 = r.header("retry-after").expect("429 carries Retry-After").parse().expect("Retry-After in seconds");
        assert!(retry >= 1, "Retry-After is at least one second: {retry}");
    }
    assert_eq!(env.events().len(), accepted, "only accepted requests were stored");
    wait_rejected(&env, "limited", limited.len() as u64);
}

#[test]
fn storage_write_failure_gets_503_never_200_and_the_daemon_recovers_when_space_returns() {
    if sqlite_only("a write failure of the database file (a file size limit on the daemon)") {
        return;
    }
    // The daemon may not grow any file past 1 MiB: once the database and its
    // WAL reach that, writes fail with EFBIG exactly as on a full disk.
    let env = TestEnv::new("[sources.api]\nauth = { type = \"none\" }\n");
    let d = env.daemon().env("RUST_LOG", "warn").max_file_size(1 << 20).start();
    let pad = "x".repeat(100_000);
    let mut acked = Vec::new();
    let mut refused = None;
    for i in 0..40 {
        let r = d.post_json("/hooks/api", &format!(r#"{{"n":{i},"pad":"{pad}"}}"#));
        match r.status {
            200 => acked.push((i, r.id())),
            503 => {
                refused = Some((i, r));
                break;
            }
            other => panic!("unexpected {other} {:?}", r.text()),
        }
    }
    let (refused_n, r) = refused.expect("a write past the file size limit must be refused, not acknowledged");
    assert!(!acked.is_empty(), "writes within the limit were acknowledged before the store filled up");
    assert_error(&r, 503, "storage unavailable");
    assert!(r.header("retry-after").is_some(), "503 carries Retry-After");

    // The daemon is still up and never pretends: a second post is refused,
    // unless a checkpoint meanwhile made room in the WAL for it, and then it
    // is stored like any acknowledged event (checked below).
    let again = d.post_json("/hooks/api", &format!(r#"{{"n":999,"pad":"{pad}"}}"#));
    let again_stored = match again.status {
        200 => {
            acked.push((999, again.id()));
            true
        }
        _ => {
            assert_error(&again, 503, "storage unavailable");
            false
        }
    };
    assert_error(&d.post_json("/hooks/nope", "{}"), 404, "no source");

    // Every acknowledged event is there; the refused ones are not.
    let stored = env.events();
    let stored_ns: Vec<i64> = stored.iter().map(|e| e["payload"]["n"].as_i64().unwrap()).collect();
    for (n, id) in &acked {
        assert!(stored.iter().any(|e| e["id"] == id.as_str()), "acknowledged event {id} (n={n}) is missing");
    }
    assert!(!stored_ns.contains(&(refused_n as i64)), "a refused event was stored: {stored_ns:?}");
    assert_eq!(stored_ns.contains(&999), again_stored, "the second post is stored exactly when it was acknowledged: {stored_ns:?}");

    // Space comes back (the limit is lifted): the same daemon stores again,
    // without a restart, and the refusals it could not count until now are counted.
    d.set_max_file_size(None);
    let id = d.post_json("/hooks/api", r#"{"n":1000}"#).id();
    assert_eq!(env.show(&id)["payload"], json!({"n": 1000}));
    wait_rejected(&env, "api", if again_stored { 1 } else { 2 });
    assert_eq!(env.events().len(), acked.len() + 1);
}

#[test]
fn backlog_over_max_backlog_gets_503_overloaded() {
    let env = TestEnv::with_server(
        "max_backlog = 0",
        r#"
[sources.api]
auth = { type = "none" }
[handlers.sink]
type = "shell"
command = ["/bin/true"]
[[routes]]
source = "api"
handler = "sink"
"#,
    );
    // Ingest only: no processor drains the queue, so the backlog stays at one.
    let d = env.daemon().arg("--role").arg("ingest").start();
    d.post_json("/hooks/api", r#"{"n":1}"#).id();
    let r = d.post_json("/hooks/api", r#"{"n":2}"#);
    assert_error(&r, 503, "overloaded");
    assert!(r.header("retry-after").is_some(), "503 carries Retry-After");
    assert_eq!(env.events().len(), 1);
    wait_rejected(&env, "api", 1);
}

// ---------------------------------------------------------------------------
// Dedup
// ---------------------------------------------------------------------------

#[test]
fn duplicate_by_json_pointer_answers_first_id_and_stores_nothing_new() {
    let env = TestEnv::new(
        r#"
[sources.netresults]
auth = { type = "none" }
dedup = { key = "/form_completion_id", window = "24h" }
"#,
    );
    let d = env.start();
    let first = d.post_json("/hooks/netresults", seeds::NETRESULTS_FORM).id();
    for _ in 0..2 {
        let again = d.post_json("/hooks/netresults", seeds::NETRESULTS_FORM);
        assert_eq!(again.status, 200);
        assert_eq!(again.json(), json!({"id": first, "status": "duplicate"}));
    }
    let other = seeds::NETRESULTS_FORM.replace("4453534", "4453535");
    let second = d.post_json("/hooks/netresults", &other).id();
    assert_ne!(second, first, "a different key is a new event");
    // No key at the pointer: not deduplicated.
    let a = d.post_json("/hooks/netresults", r#"{"x":1}"#).id();
    let b = d.post_json("/hooks/netresults", r#"{"x":1}"#).id();
    assert_ne!(a, b);

    assert_eq!(env.events().len(), 4);
    let mut dups = 0;
    wait_until(STATS_WAIT, || {
        dups = env.stat("netresults", "duplicates");
        dups == 2
    });
    assert_eq!(dups, 2, "stats count the duplicates");
    assert_eq!(env.stat("netresults", "received"), 4);
}

#[test]
fn duplicate_by_header_answers_first_id_and_stores_nothing_new() {
    let env = TestEnv::new(
        r#"
[sources.api]
auth = { type = "none" }
dedup = { key = "header:X-Delivery-Id", window = "1h" }
"#,
    );
    let d = env.start();
    let post = |delivery: &str, body: &str| {
        d.request("POST", "/hooks/api")
            .header("content-type", "application/json")
            .header("x-delivery-id", delivery)
            .body(body.to_string())
            .send()
    };
    let first = post("dlv-1", r#"{"n":1}"#).id();
    let dup = post("dlv-1", r#"{"n":"a different body"}"#);
    assert_eq!(dup.json(), json!({"id": first, "status": "duplicate"}));
    let second = post("dlv-2", r#"{"n":1}"#).id();
    assert_ne!(first, second);
    let events = env.events();
    assert_eq!(events.len(), 2);
    assert_eq!(env.show(&first)["payload"], json!({"n": 1}), "the first event is kept as it was");
    wait_for("stats to count one duplicate", STATS_WAIT, || env.stat("api", "duplicates") == 1);
}

// ---------------------------------------------------------------------------
// Secrets and responses
// ---------------------------------------------------------------------------

#[test]
fn secrets_never_reach_stored_headers_query_or_debug_logs() {
    let env = TestEnv::new(
        r#"
[sources.hdr]
auth = { type = "header_token", header = "X-Webhook-Token", secret_env = "HDR_TOKEN" }
[sources.qry]
auth = { type = "query_token", param = "key", secret_env = "QRY_TOKEN" }
[sources.basic]
auth = { type = "basic", username = "sender", secret_env = "BASIC_PW" }
"#,
    );
    let secrets = ["hdrSecretValue1", "qrySecretValue2", "basicSecretValue3"];
    let wrong = ["wrongGuessValue4", "wrongGuessValue5"];
    let basic = base64::engine::general_purpose::STANDARD.encode(format!("sender:{}", secrets[2]));
    let d =
        env.daemon().env("RUST_LOG", "debug").env("HDR_TOKEN", secrets[0]).env("QRY_TOKEN", secrets[1]).env("BASIC_PW", secrets[2]).start();
    let json_post = |path: &str| d.request("POST", path).header("content-type", "application/json").body(r#"{"email":"a@b.c"}"#);
    let ids = [
        json_post("/hooks/hdr").header("x-webhook-token", secrets[0]).send().id(),
        json_post(&format!("/hooks/qry?utm=x&key={}", secrets[1])).send().id(),
        d.get(&format!("/hooks/qry?email=a%40b.c&key={}", secrets[1])).id(),
        json_post("/hooks/basic").header("authorization", &format!("Basic {basic}")).send().id(),
        json_post("/hooks/hdr").header("x-webhook-token", secrets[0]).header("cookie", "session=cookieSecret6").send().id(),
    ];
    assert_eq!(json_post("/hooks/hdr").header("x-webhook-token", wrong[0]).send().status, 401);
    assert_eq!(json_post(&format!("/hooks/qry?key={}", wrong[1])).send().status, 401);

    for id in &ids {
        let ev = env.show(id);
        let text = ev.to_string();
        for s in secrets.iter().chain(["cookieSecret6"].iter()) {
            assert!(!text.contains(s), "secret {s} is stored in event {id}: {text}");
        }
    }
    assert_eq!(env.show(&ids[1])["query"], "utm=x&key=[redacted]");
    let ping = env.show(&ids[2]);
    assert_eq!(ping["payload"], json!({"email": "a@b.c"}), "the query token is not part of the normalized view");
    assert_eq!(env.show(&ids[4])["headers"]["cookie"], "[redacted]");

    // Stop the daemon cleanly so every log line is flushed, then search the log.
    let mut d = d;
    d.sigterm();
    assert!(d.wait_exit(Duration::from_secs(30)).success());
    let log = env.log();
    assert!(log.contains(&ids[0]), "the log carries event ids: {log}");
    for s in secrets.iter().chain(wrong.iter()).chain(["cookieSecret6"].iter()) {
        assert!(!log.contains(s), "secret {s} appears in the daemon's log:\n{log}");
    }
}

#[test]
fn response_template_replaces_the_success_answer() {
    let env = TestEnv::new(
        r#"
[sources.custom]
auth = { type = "none" }
response = { status = 201, body = '{"ok":"{{id}}","email":"{{/email}}","missing":"{{/nope}}"}' }
[sources.xmlish]
auth = { type = "none" }
response = { body = '<ok id="{{id}}">{{/name}}</ok>', content_type = "application/xml" }
"#,
    );
    let d = env.start();
    let r = d.post_json("/hooks/custom", r#"{"email":"ann\"q@example.com"}"#);
    assert_eq!(r.status, 201);
    assert_eq!(r.header("content-type").as_deref(), Some("application/json"));
    let body = r.json();
    let id = body["ok"].as_str().expect("the id is in the template").to_string();
    assert!(id.starts_with("evt_"), "{body}");
    assert_eq!(body, json!({"ok": id, "email": "ann\"q@example.com", "missing": ""}), "values are JSON-escaped");
    assert_eq!(env.show(&id)["source"], "custom", "the answered id is the stored event");

    let r = d.post("/hooks/xmlish", "application/x-www-form-urlencoded", "name=A%26B+%3Cx%3E");
    assert_eq!(r.status, 200);
    assert_eq!(r.header("content-type").as_deref(), Some("application/xml"));
    let text = r.text();
    assert!(text.ends_with(">A&amp;B &lt;x&gt;</ok>"), "values are XML-escaped: {text}");
}

#[test]
fn unquoted_json_placeholders_are_inserted_as_values_so_a_payload_cannot_add_keys() {
    let env = TestEnv::new(
        r#"
[sources.tpl]
auth = { type = "none" }
response = { body = '{"n":{{/n}},"k":{{/k}},"gone":{{/nope}},"id":{{id}}}' }
"#,
    );
    let d = env.start();
    // The attack from the report: a string value that would close `n` and add a key.
    let r = d.post_json("/hooks/tpl", r#"{"n":"1,\"a\":2","k":7}"#);
    assert_eq!(r.status, 200, "{}", r.text());
    let body: serde_json::Value = serde_json::from_str(&r.text()).unwrap_or_else(|e| panic!("not JSON ({e}): {}", r.text()));
    let id = body["id"].as_str().expect("the id is a JSON string").to_string();
    assert_eq!(body, json!({"n": "1,\"a\":2", "k": 7, "gone": null, "id": id}), "no key was added by the payload");
    assert_eq!(env.show(&id)["source"], "tpl");
}
