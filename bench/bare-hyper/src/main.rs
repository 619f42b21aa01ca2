//! Bare hyper 1.x server: the ceiling hooktrail is measured against.
//!
//! Same runtime shape as hooktrail's listener (tokio multi-thread runtime with
//! default worker count, one task per connection, HTTP/1.1 keep-alive,
//! TCP_NODELAY), reads the whole request body, answers 200 with a JSON body of
//! the same shape as hooktrail's, and stores nothing.
//!
//! Usage: bare-hyper [ADDR]   (default 127.0.0.1:0); prints `listening on ADDR`.

use std::convert::Infallible;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::header::{HeaderValue, CONTENT_TYPE};
use hyper::{Request, Response};
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;

const ANSWER: &str = r#"{"id":"evt_01JD000000000000000000000000","status":"accepted"}"#;

async fn handle(req: Request<Incoming>) -> Result<Response<Full<Bytes>>, Infallible> {
    // Read the body like a real receiver must; a read error still gets an answer.
    let _ = req.into_body().collect().await;
    let mut r = Response::new(Full::new(Bytes::from_static(ANSWER.as_bytes())));
    r.headers_mut().insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    Ok(r)
}

#[tokio::main]
async fn main() -> std::io::Result<()> {
    let addr = std::env::args().nth(1).unwrap_or_else(|| "127.0.0.1:0".into());
    let listener = TcpListener::bind(&addr).await?;
    println!("listening on {}", listener.local_addr()?);
    let builder = hyper::server::conn::http1::Builder::new();
    loop {
        let (stream, _) = tokio::select! {
            r = listener.accept() => match r {
                Ok(x) => x,
                Err(e) => { eprintln!("accept: {e}"); continue; }
            },
            _ = tokio::signal::ctrl_c() => return Ok(()),
        };
        let _ = stream.set_nodelay(true);
        let conn = builder.serve_connection(TokioIo::new(stream), hyper::service::service_fn(handle));
        tokio::spawn(async move {
            let _ = conn.await;
        });
    }
}
