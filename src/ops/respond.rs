//! The answers every admin route builds: one place for the headers they all
//! carry (no caching, no framing, no sniffing) and for the JSON error shape,
//! so the API, the page and the access checks cannot drift apart. A leaf of
//! `ops`: it imports nothing of the admin listener.

use bytes::Bytes;
use http_body_util::Full;
use hyper::header::{HeaderValue, CACHE_CONTROL, CONTENT_TYPE, LOCATION};
use hyper::{Response, StatusCode};
use serde::Serialize;

/// An admin answer.
pub(super) type Resp = Response<Full<Bytes>>;

/// The last value of `key` in a urlencoded string.
pub(super) fn form_value(form: &str, key: &str) -> Option<String> {
    serde_urlencoded::from_str::<Vec<(String, String)>>(form).ok()?.into_iter().rev().find(|(k, _)| k == key).map(|(_, v)| v)
}

/// Headers every admin answer carries: nothing here may be cached or framed.
fn harden(resp: &mut Resp) {
    let h = resp.headers_mut();
    h.insert(CACHE_CONTROL, HeaderValue::from_static("no-store"));
    h.insert("x-content-type-options", HeaderValue::from_static("nosniff"));
    h.insert("referrer-policy", HeaderValue::from_static("same-origin"));
    h.insert("x-frame-options", HeaderValue::from_static("DENY"));
}

pub(super) fn respond(status: StatusCode, content_type: &'static str, body: impl Into<Bytes>) -> Resp {
    let mut resp = Response::new(Full::new(body.into()));
    *resp.status_mut() = status;
    resp.headers_mut().insert(CONTENT_TYPE, HeaderValue::from_static(content_type));
    harden(&mut resp);
    resp
}

pub(super) fn text(status: StatusCode, body: impl Into<Bytes>) -> Resp {
    respond(status, "text/plain; charset=utf-8", body)
}

pub(super) fn json<T: Serialize + ?Sized>(status: StatusCode, value: &T) -> Resp {
    match serde_json::to_vec(value) {
        Ok(body) => respond(status, "application/json", body),
        Err(e) => json_error(StatusCode::INTERNAL_SERVER_ERROR, &format!("cannot serialize the answer: {e}")),
    }
}

pub(super) fn json_error(status: StatusCode, message: &str) -> Resp {
    respond(status, "application/json", serde_json::json!({ "error": message }).to_string())
}

/// 303 See Other: after a form POST the browser GETs `location`.
pub(super) fn redirect(location: &str) -> Resp {
    let mut resp = respond(StatusCode::SEE_OTHER, "text/plain; charset=utf-8", "");
    if let Ok(v) = HeaderValue::from_str(location) {
        resp.headers_mut().insert(LOCATION, v);
    }
    resp
}
