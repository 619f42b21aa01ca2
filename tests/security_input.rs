//! Hostile bodies and framing through the real binary (issue 5): entity
//! expansion and external entities in XML, nesting bombs, ambiguous HTTP
//! framing. Each gets a clear 4xx (or is stored inertly), the daemon keeps
//! serving, and nothing outside the request leaks into storage.

mod common;

use std::time::Duration;

use common::*;

const SOURCE: &str = "[sources.a]\nauth = { type = \"none\" }\n";

#[test]
fn xml_entity_expansion_bomb_is_refused_with_400_without_expanding() {
    let env = TestEnv::new(SOURCE);
    let d = env.start();
    let mut doc = String::from("<?xml version=\"1.0\"?>\n<!DOCTYPE lolz [\n<!ENTITY lol \"lol\">\n");
    for i in 1..=9 {
        let prev = if i == 1 { "lol".to_string() } else { format!("lol{}", i - 1) };
        doc.push_str(&format!("<!ENTITY lol{i} \"{}\">\n", format!("&{prev};").repeat(10)));
    }
    doc.push_str("]>\n<lolz>&lol9;</lolz>");
    let r = d.post("/hooks/a", "application/xml", doc);
    assert_eq!(r.status, 400, "{}", r.text());
    assert!(r.error().contains("invalid XML"), "{}", r.error());
    wait_for("the 400 to be counted", Duration::from_secs(10), || env.stat("a", "rejected") == 1);
    assert!(env.events().is_empty());
    d.post_json("/hooks/a", "{}").id();
}

#[test]
fn xml_external_entity_is_never_resolved() {
    let env = TestEnv::new(SOURCE);
    let d = env.start();
    let doc = "<?xml version=\"1.0\"?>\n<!DOCTYPE r [<!ENTITY xxe SYSTEM \"file:///etc/passwd\">]>\n<r><v>&xxe;</v></r>";
    let r = d.post("/hooks/a", "text/xml", doc);
    // Refused as an unknown entity; were it ever accepted, the file must not be in it.
    assert_eq!(r.status, 400, "{}", r.text());
    for ev in env.events() {
        assert!(!env.show(ev["id"].as_str().unwrap()).to_string().contains("root:"), "a local file leaked into storage");
    }
}

#[test]
fn json_and_xml_nesting_bombs_are_refused_with_400_and_the_daemon_survives() {
    let env = TestEnv::new(SOURCE);
    let d = env.start();
    // Deep enough to overflow a recursive parser's stack, small enough for max_body_bytes.
    let json = "[".repeat(500_000);
    let r = d.post_json("/hooks/a", json.as_str());
    assert_eq!(r.status, 400, "{}", r.text());
    assert!(r.error().contains("nests deeper than 128"), "{}", r.error());
    let xml = "<a>".repeat(200_000);
    let r = d.post("/hooks/a", "application/xml", xml);
    assert_eq!(r.status, 400, "{}", r.text());
    assert!(r.error().contains("XML nests deeper than 128"), "{}", r.error());
    // Brackets inside strings are data, not nesting.
    let id = d.post_json("/hooks/a", format!("{{\"s\":\"{}\"}}", "[".repeat(10_000)).as_str()).id();
    assert_eq!(env.show(&id)["payload"]["s"].as_str().map(str::len), Some(10_000));
}

#[test]
fn ambiguous_framing_is_refused_rather_than_guessed() {
    let env = TestEnv::new(SOURCE);
    let d = env.start();
    // Two different Content-Length values: a request-smuggling classic.
    let r =
        d.raw(b"POST /hooks/a HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 2\r\nContent-Length: 9\r\n\r\n{}");
    assert_eq!(r.status, 400, "duplicate Content-Length got {}", r.status);
    // A Content-Length that is not a number.
    let r = d.raw(b"POST /hooks/a HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 2x\r\n\r\n{}");
    assert_eq!(r.status, 400);
    // A bad chunk size inside a chunked body.
    let r = d.raw(
        b"POST /hooks/a HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n{}\r\n0\r\n\r\n",
    );
    assert_eq!(r.status, 400, "{}", r.text());
    assert!(env.events().is_empty());
    d.post_json("/hooks/a", "{}").id();
}
