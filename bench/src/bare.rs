//! `floodgate-bare`: the ceiling the edge is measured against. A bare hyper HTTP/1.1
//! server on the same runtime shape as `floodgate ingest` (tokio, multi-threaded, mimalloc)
//! that reads each request's whole body and answers 200 with a small JSON body, doing
//! nothing else: no parse, no validation, no storage. The gap between its throughput and
//! the edge's, in the same run, is what the edge's own work costs.
//!
//!   floodgate-bare [--listen 127.0.0.1:18180]

use std::convert::Infallible;
use std::net::SocketAddr;

use anyhow::Result;
use bytes::Bytes;
use clap::Parser;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Request, Response};
use hyper_util::rt::TokioIo;

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Parser, Debug)]
struct Args {
    /// Where to listen (only ever loopback for load tests).
    #[arg(long, default_value = "127.0.0.1:18180")]
    listen: SocketAddr,
}

async fn answer(req: Request<Incoming>) -> Result<Response<Full<Bytes>>, Infallible> {
    let bytes = match req.into_body().collect().await {
        Ok(body) => body.to_bytes().len(),
        Err(_) => 0,
    };
    let mut resp = Response::new(Full::new(Bytes::from(format!("{{\"read\":{bytes}}}"))));
    resp.headers_mut().insert(
        hyper::header::CONTENT_TYPE,
        hyper::header::HeaderValue::from_static("application/json"),
    );
    Ok(resp)
}

fn main() -> Result<()> {
    let args = Args::parse();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    rt.block_on(async move {
        let listener = tokio::net::TcpListener::bind(args.listen).await?;
        eprintln!("floodgate-bare listening on {}", listener.local_addr()?);
        loop {
            let (stream, _) = listener.accept().await?;
            let _ = stream.set_nodelay(true);
            tokio::spawn(async move {
                let _ = http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), service_fn(answer))
                    .await;
            });
        }
    })
}
