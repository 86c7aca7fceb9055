//! Request smuggling corpus: raw HTTP/1.1 requests written byte for byte to a real `fulcrum`
//! (one listener, one `fulcrum backend`), each with the statuses Fulcrum must answer, whether
//! it keeps the connection, and how many requests the backend must see (its `/stats` counter,
//! read on the backend directly): never a second, smuggled one. A connection expected to stay
//! open must then serve a plain `GET` (a smuggled prefix left in its buffer would show there).
//! Some cases also check what the backend received (its `?echo=headers` JSON).
//!
//! HTTP/2 (prior knowledge) cases follow, as raw frames: connection-specific headers,
//! pseudo-header abuse, CRLF in values, DATA beyond `content-length` (the h2 crate refuses
//! them before Fulcrum sees a request), duplicate `Host` and `:authority` against `Host`.

mod common;

use std::time::Duration;

use common::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// What becomes of the connection after the answers.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Conn {
    /// Kept alive: a further request is served.
    Open,
    /// Closed by Fulcrum.
    Closed,
    /// Switched protocols (101): a tunnel, not checked further.
    Tunnel,
}

/// One request of the corpus.
struct Case {
    name: &'static str,
    bytes: Vec<u8>,
    /// The final statuses answered, in order (1xx interim answers not listed).
    statuses: &'static [u16],
    conn: Conn,
    /// Requests the backend counts (`/ws` and `/stats` are not counted).
    forwarded: u64,
    /// `forwarded` is a maximum: a body that turns out malformed may or may not have reached
    /// the backend's handler before Fulcrum gave up on it (never more than the one request).
    at_most: bool,
    /// Headers the backend must (Some) or must not (None) have received, read from the first
    /// answer's `?echo=headers` JSON.
    echo: &'static [(&'static str, Option<&'static str>)],
}

fn case(
    name: &'static str,
    bytes: impl AsRef<[u8]>,
    statuses: &'static [u16],
    conn: Conn,
    forwarded: u64,
) -> Case {
    Case {
        name,
        bytes: bytes.as_ref().to_vec(),
        statuses,
        conn,
        forwarded,
        at_most: false,
        echo: &[],
    }
}

/// `case`, whose `forwarded` is a maximum.
fn upto(mut case: Case) -> Case {
    case.at_most = true;
    case
}

fn echo(mut case: Case, echo: &'static [(&'static str, Option<&'static str>)]) -> Case {
    case.echo = echo;
    case
}

/// `POST /` with `headers` (each ending in CRLF) and then `body`.
fn post(headers: &str, body: &str) -> Vec<u8> {
    format!("POST / HTTP/1.1\r\nHost: t\r\n{headers}\r\n{body}").into_bytes()
}

/// A plain GET, pipelined after a case's bytes.
const GET: &str = "GET / HTTP/1.1\r\nHost: t\r\n\r\n";

const WS: &str = "Connection: Upgrade\r\nSec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n";

fn corpus() -> Vec<Case> {
    use Conn::*;
    let inner = "GPOST / HTTP/1.1\r\nHost: t\r\nContent-Length: 15\r\n\r\nx=1";
    let te_cl = format!("{:x}\r\n{inner}\r\n0\r\n\r\n", inner.len());
    let long_ext = format!("5;{}\r\nhello\r\n0\r\n\r\n", "a".repeat(20_000));
    let huge_header = format!(
        "GET / HTTP/1.1\r\nHost: t\r\nX-Big: {}\r\n\r\n",
        "a".repeat(300_000)
    );
    // A request head of exactly `max_header_bytes` (the default, 65536) passes; one byte more
    // is 431, however few reads it arrives in.
    let head_of = |total: usize| {
        let prefix = "GET / HTTP/1.1\r\nHost: t\r\nX-Big: ";
        format!("{prefix}{}\r\n\r\n", "a".repeat(total - prefix.len() - 4))
    };
    let exact_head = head_of(65_536);
    let over_head = head_of(65_537);
    // The listener's `max_body_bytes` is 1024 (see `config`).
    let kib = "a".repeat(1024);
    let half = "b".repeat(512);
    let chunked_at_limit = format!("200\r\n{half}\r\n200\r\n{half}\r\n0\r\n\r\n");
    let chunked_past_limit = format!("200\r\n{half}\r\n200\r\n{half}\r\n1\r\nc\r\n0\r\n\r\n");
    vec![
        case("baseline GET", GET, &[200], Open, 1),
        case("head of exactly max_header_bytes", exact_head, &[200], Open, 1),
        case("head one byte over max_header_bytes", over_head, &[431], Closed, 0),
        case("Content-Length of exactly max_body_bytes", post("Content-Length: 1024\r\n", &kib), &[200], Open, 1),
        case("Content-Length one byte over max_body_bytes", post("Content-Length: 1025\r\n", &format!("{kib}a")), &[413], Closed, 0),
        case("Content-Length far over max_body_bytes, body not sent", post("Content-Length: 1000000000\r\n", ""), &[413], Closed, 0),
        case("chunked body of exactly max_body_bytes", post("Transfer-Encoding: chunked\r\n", &chunked_at_limit), &[200], Open, 1),
        // Cut off while streaming: the backend's request is aborted (its handler may have
        // started; it never sees the whole body), the client gets 413 and is closed.
        upto(case("chunked body growing past max_body_bytes", post("Transfer-Encoding: chunked\r\n", &chunked_past_limit), &[413], Closed, 1)),
        case("baseline POST with Content-Length", post("Content-Length: 5\r\n", "hello"), &[200], Open, 1),
        case("baseline chunked POST", post("Transfer-Encoding: chunked\r\n", "5\r\nhello\r\n0\r\n\r\n"), &[200], Open, 1),
        // CL + TE: chunked wins, Content-Length is dropped, and the connection closes after
        // the answer, so the bytes after the chunked body are never read as a request.
        case("CL then TE, smuggled GET after the chunked body",
            post("Content-Length: 40\r\nTransfer-Encoding: chunked\r\n", &format!("0\r\n\r\n{GET}")), &[200], Closed, 1),
        case("TE then CL, smuggled GET after the chunked body",
            post("Transfer-Encoding: chunked\r\nContent-Length: 3\r\n", &format!("0\r\n\r\n{GET}")), &[200], Closed, 1),
        case("CL shorter than the chunked body (TE.CL)",
            post("Transfer-Encoding: chunked\r\nContent-Length: 4\r\n", &te_cl), &[200], Closed, 1),
        case("duplicate equal Content-Length", post("Content-Length: 5\r\nContent-Length: 5\r\n", "hello"), &[200], Open, 1),
        case("conflicting Content-Length", post("Content-Length: 5\r\nContent-Length: 6\r\n", "hello!"), &[400], Closed, 0),
        case("Content-Length list", post("Content-Length: 5, 6\r\n", "hello!"), &[400], Closed, 0),
        case("Content-Length with plus sign", post("Content-Length: +5\r\n", "hello"), &[400], Closed, 0),
        case("negative Content-Length", post("Content-Length: -1\r\n", "hello"), &[400], Closed, 0),
        case("Content-Length with inner space", post("Content-Length: 1 0\r\n", "helloworld"), &[400], Closed, 0),
        case("hex Content-Length", post("Content-Length: 0x5\r\n", "hello"), &[400], Closed, 0),
        case("overflowing Content-Length", post("Content-Length: 99999999999999999999999\r\n", "hello"), &[400], Closed, 0),
        case("Content-Length with leading zeros (unambiguous)", post("Content-Length: 0005\r\n", "hello"), &[200], Open, 1),
        case("space before the colon of Content-Length", post("Content-Length : 5\r\n", "hello"), &[400], Closed, 0),
        case("TE xchunked", post("Transfer-Encoding: xchunked\r\n", "5\r\nhello\r\n0\r\n\r\n"), &[400], Closed, 0),
        case("TE chunked, identity", post("Transfer-Encoding: chunked, identity\r\n", "5\r\nhello\r\n0\r\n\r\n"), &[400], Closed, 0),
        case("TE identity, chunked", post("Transfer-Encoding: identity, chunked\r\n", "5\r\nhello\r\n0\r\n\r\n"), &[400], Closed, 0),
        case("TE gzip, chunked", post("Transfer-Encoding: gzip, chunked\r\n", "5\r\nhello\r\n0\r\n\r\n"), &[400], Closed, 0),
        case("TE chunked twice", post("Transfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n", "5\r\nhello\r\n0\r\n\r\n"), &[400], Closed, 0),
        case("TE Chunked (case-insensitive)", post("Transfer-Encoding: Chunked\r\n", "5\r\nhello\r\n0\r\n\r\n"), &[200], Open, 1),
        case("TE with tab before the value", post("Transfer-Encoding:\tchunked\r\n", "5\r\nhello\r\n0\r\n\r\n"), &[200], Open, 1),
        case("space before the colon of TE", post("Transfer-Encoding : chunked\r\n", "5\r\nhello\r\n0\r\n\r\n"), &[400], Closed, 0),
        case("TE obs-fold", post("Transfer-Encoding:\r\n chunked\r\n", "5\r\nhello\r\n0\r\n\r\n"), &[400], Closed, 0),
        case("TE with vertical tab", post("Transfer-Encoding: \x0bchunked\r\n", "5\r\nhello\r\n0\r\n\r\n"), &[400], Closed, 0),
        case("obs-fold in another header", "GET / HTTP/1.1\r\nHost: t\r\nX-A: 1\r\n 2\r\n\r\n", &[400], Closed, 0),
        case("bare CR in a header value", "GET / HTTP/1.1\r\nHost: t\r\nX-A: 1\rX-B: 2\r\n\r\n", &[400], Closed, 0),
        case("bare CR as line ending", "GET / HTTP/1.1\rHost: t\r\r", &[400], Closed, 0),
        // Bare LF line endings are allowed by RFC 9112 §2.2; the request is re-framed.
        case("bare LF line endings", "GET / HTTP/1.1\nHost: t\n\n", &[200], Open, 1),
        case("NUL in a header value", "GET / HTTP/1.1\r\nHost: t\r\nX-A: 1\x002\r\n\r\n", &[400], Closed, 0),
        case("NUL in a header name", "GET / HTTP/1.1\r\nHost: t\r\nX\x00A: 1\r\n\r\n", &[400], Closed, 0),
        case("space in a header name", "GET / HTTP/1.1\r\nHost: t\r\nX A: 1\r\n\r\n", &[400], Closed, 0),
        case("non-token byte in a header name", "GET / HTTP/1.1\r\nHost: t\r\nX\"A: 1\r\n\r\n", &[400], Closed, 0),
        case("header line without colon", "GET / HTTP/1.1\r\nHost: t\r\nX-A\r\n\r\n", &[400], Closed, 0),
        case("space in the request target", "GET /a b HTTP/1.1\r\nHost: t\r\n\r\n", &[400], Closed, 0),
        upto(case("invalid chunk size", post("Transfer-Encoding: chunked\r\n", "zz\r\nhello\r\n0\r\n\r\n"), &[400], Closed, 1)),
        upto(case("negative chunk size", post("Transfer-Encoding: chunked\r\n", "-5\r\nhello\r\n0\r\n\r\n"), &[400], Closed, 1)),
        upto(case("overflowing chunk size", post("Transfer-Encoding: chunked\r\n", "fffffffffffffffffffff\r\nhello\r\n0\r\n\r\n"), &[400], Closed, 1)),
        upto(case("oversized chunk extension", post("Transfer-Encoding: chunked\r\n", &long_ext), &[400], Closed, 1)),
        case("chunk size with many leading zeros", post("Transfer-Encoding: chunked\r\n", &format!("{}5\r\nhello\r\n0\r\n\r\n", "0".repeat(100))), &[200], Open, 1),
        upto(case("chunk data longer than its size", post("Transfer-Encoding: chunked\r\n", "3\r\nhello\r\n0\r\n\r\n"), &[400], Closed, 1)),
        case("chunked body then pipelined GET",
            post("Transfer-Encoding: chunked\r\n", &format!("5\r\nhello\r\n0\r\n\r\n{GET}")), &[200, 200], Open, 2),
        case("Content-Length body then pipelined GET",
            post("Content-Length: 5\r\n", &format!("hello{GET}")), &[200, 200], Open, 2),
        case("HTTP/1.0 with TE", "POST / HTTP/1.0\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n", &[400], Closed, 0),
        case("HTTP/1.0 without Host", "GET / HTTP/1.0\r\n\r\n", &[200], Closed, 1),
        case("unknown HTTP version", "GET / HTTP/1.2\r\nHost: t\r\n\r\n", &[400], Closed, 0),
        case("HTTP/1.1 without Host", "GET / HTTP/1.1\r\n\r\n", &[400], Closed, 0),
        case("duplicate Host", "GET / HTTP/1.1\r\nHost: a.test\r\nHost: b.test\r\n\r\n", &[400], Closed, 0),
        case("Host with userinfo", "GET / HTTP/1.1\r\nHost: evil.test@good.test\r\n\r\n", &[400], Closed, 0),
        case("Host with a path", "GET / HTTP/1.1\r\nHost: good.test/evil\r\n\r\n", &[400], Closed, 0),
        case("Host with a space", "GET / HTTP/1.1\r\nHost: good.test evil.test\r\n\r\n", &[400], Closed, 0),
        echo(case("absolute-form target wins over Host",
            "GET http://good.test/?echo=headers HTTP/1.1\r\nHost: evil.test\r\n\r\n", &[200], Open, 1),
            &[("host", Some("good.test")), ("x-forwarded-host", Some("good.test"))]),
        echo(case("absolute-form target without Host",
            "GET http://good.test:8080/?echo=headers HTTP/1.1\r\n\r\n", &[200], Open, 1),
            &[("host", Some("good.test:8080"))]),
        case("absolute-form target with userinfo",
            "GET http://evil.test@good.test/ HTTP/1.1\r\nHost: good.test\r\n\r\n", &[400], Closed, 0),
        case("CONNECT", "CONNECT good.test:443 HTTP/1.1\r\nHost: good.test:443\r\n\r\n", &[400], Closed, 0),
        case("Expect: 100-continue with the body sent at once",
            post("Content-Length: 5\r\nExpect: 100-continue\r\n", "hello"), &[200], Open, 1),
        case("Expect: 100-continue without a body",
            "GET / HTTP/1.1\r\nHost: t\r\nExpect: 100-continue\r\n\r\n", &[200], Open, 1),
        case("Expect: 100-continue then a pipelined GET",
            post("Content-Length: 5\r\nExpect: 100-continue\r\n", &format!("hello{GET}")), &[200, 200], Open, 2),
        case("unknown Expect", post("Content-Length: 5\r\nExpect: 200-ok\r\n", "hello"), &[200], Open, 1),
        echo(case("h2c upgrade is served as plain HTTP/1.1",
            "GET /?echo=headers HTTP/1.1\r\nHost: t\r\nConnection: Upgrade, HTTP2-Settings\r\nUpgrade: h2c\r\nHTTP2-Settings: AAMAAABkAARAAAAAAAIAAAAA\r\n\r\n", &[200], Open, 1),
            &[("upgrade", None), ("http2-settings", None), ("connection", None)]),
        echo(case("H2C upgrade (upper case) is served as plain HTTP/1.1",
            "GET /?echo=headers HTTP/1.1\r\nHost: t\r\nConnection: upgrade\r\nUpgrade: H2C\r\nHTTP2-Settings: AAMAAABkAARAAAAAAAIAAAAA\r\n\r\n", &[200], Open, 1),
            &[("upgrade", None), ("http2-settings", None)]),
        echo(case("h2c upgrade with a body",
            "POST /?echo=headers HTTP/1.1\r\nHost: t\r\nConnection: Upgrade, HTTP2-Settings\r\nUpgrade: h2c\r\nHTTP2-Settings: AAMAAABkAARAAAAAAAIAAAAA\r\nContent-Length: 5\r\n\r\nhello", &[200], Open, 1),
            &[("upgrade", None), ("http2-settings", None)]),
        echo(case("unlisted upgrade protocol is served as plain HTTP/1.1",
            "GET /?echo=headers HTTP/1.1\r\nHost: t\r\nConnection: upgrade\r\nUpgrade: foo/1\r\n\r\n", &[200], Open, 1),
            &[("upgrade", None)]),
        echo(case("Upgrade without Connection: upgrade is removed",
            "GET /?echo=headers HTTP/1.1\r\nHost: t\r\nUpgrade: websocket\r\n\r\n", &[200], Open, 1),
            &[("upgrade", None)]),
        case("WebSocket upgrade (mixed case)",
            format!("GET /ws HTTP/1.1\r\nHost: t\r\nUpgrade: WebSocket\r\n{WS}\r\n"), &[101], Tunnel, 0),
        case("WebSocket offered with h2c: only websocket is passed",
            format!("GET /ws HTTP/1.1\r\nHost: t\r\nUpgrade: h2c, websocket\r\n{WS}\r\n"), &[101], Tunnel, 0),
        case("oversized header section", huge_header, &[431], Closed, 0),
    ]
}

/// Config with one HTTP listener `web` in front of `backend`.
fn config(backend: std::net::SocketAddr) -> String {
    format!(
        "[admin]\nlisten = \"127.0.0.1:0\"\n\n\
         [listeners.web]\nlisten = \"127.0.0.1:0\"\nprotocol = \"http\"\npool = \"app\"\n\
         max_body_bytes = 1024\n\n\
         [pools.app]\nbackends = [\"{backend}\"]\n"
    )
}

/// The backend's answered-request counter (read on the backend itself).
async fn backend_requests(backend: std::net::SocketAddr) -> u64 {
    let mut stream = TcpStream::connect(backend).await.unwrap();
    stream
        .write_all(b"GET /stats HTTP/1.1\r\nHost: b\r\nConnection: close\r\n\r\n")
        .await
        .unwrap();
    let mut text = String::new();
    stream.read_to_string(&mut text).await.unwrap();
    let body = text.split_once("\r\n\r\n").unwrap().1;
    let stats: serde_json::Value = serde_json::from_str(body.trim()).unwrap();
    stats["requests"].as_u64().unwrap()
}

/// One parsed answer.
struct Answer {
    status: u16,
    body: String,
}

/// Reads answers from `stream` until `want` final ones arrived, the connection closed or
/// nothing came for a while; 1xx answers are skipped. Returns them and whether it closed.
async fn read_answers(stream: &mut TcpStream, want: usize) -> (Vec<Answer>, bool) {
    let mut data = Vec::new();
    let mut answers = Vec::new();
    let mut closed = false;
    loop {
        // Parse what is complete.
        while let Some(end) = find(&data, b"\r\n\r\n") {
            let head = String::from_utf8_lossy(&data[..end]).into_owned();
            let status: u16 = head
                .split(' ')
                .nth(1)
                .and_then(|s| s.parse().ok())
                .unwrap_or_else(|| panic!("bad status line: {head:?}"));
            let start = end + 4;
            let header = |name: &str| {
                head.lines().skip(1).find_map(|line| {
                    let (n, v) = line.split_once(':')?;
                    n.trim()
                        .eq_ignore_ascii_case(name)
                        .then(|| v.trim().to_string())
                })
            };
            let body_end = if (100..200).contains(&status) {
                Some(start)
            } else if let Some(length) = header("content-length") {
                let length: usize = length.parse().unwrap();
                (data.len() >= start + length).then_some(start + length)
            } else if header("transfer-encoding").is_some() {
                find(&data[start..], b"0\r\n\r\n").map(|at| start + at + 5)
            } else {
                Some(start)
            };
            let Some(body_end) = body_end else { break };
            if status >= 200 || status == 101 {
                answers.push(Answer {
                    status,
                    body: String::from_utf8_lossy(&data[start..body_end]).into_owned(),
                });
            }
            data.drain(..body_end);
        }
        if answers.len() >= want || closed {
            return (answers, closed);
        }
        let mut buffer = [0u8; 8192];
        match tokio::time::timeout(Duration::from_secs(3), stream.read(&mut buffer)).await {
            Ok(Ok(0) | Err(_)) => closed = true,
            Ok(Ok(n)) => data.extend_from_slice(&buffer[..n]),
            Err(_) => return (answers, false),
        }
    }
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}

/// Whether Fulcrum closes `stream` (EOF or reset) within a few seconds.
async fn closes(stream: &mut TcpStream) -> bool {
    let mut buffer = [0u8; 1024];
    loop {
        match tokio::time::timeout(Duration::from_secs(3), stream.read(&mut buffer)).await {
            Ok(Ok(0) | Err(_)) => return true,
            Ok(Ok(_)) => {}
            Err(_) => return false,
        }
    }
}

/// Runs one case; returns what went wrong, if anything.
async fn run(
    case: &Case,
    lb: std::net::SocketAddr,
    backend: std::net::SocketAddr,
) -> Option<String> {
    let before = backend_requests(backend).await;
    let mut stream = TcpStream::connect(lb).await.unwrap();
    // A peer that closes early may reset the rest of a large write: that is an outcome too.
    let _ = stream.write_all(&case.bytes).await;
    let (answers, closed) = read_answers(&mut stream, case.statuses.len()).await;
    let statuses: Vec<u16> = answers.iter().map(|a| a.status).collect();
    let mut problems = Vec::new();
    if statuses != case.statuses {
        problems.push(format!(
            "statuses {statuses:?}, expected {:?}",
            case.statuses
        ));
    }
    let mut forwarded = case.forwarded;
    match case.conn {
        Conn::Open if closed => problems.push("connection closed, expected open".into()),
        Conn::Open => {
            stream.write_all(GET.as_bytes()).await.unwrap();
            let (after, _) = read_answers(&mut stream, 1).await;
            let after: Vec<u16> = after.iter().map(|a| a.status).collect();
            if after != [200] {
                problems.push(format!("follow-up GET answered {after:?}"));
            }
            forwarded += 1;
        }
        Conn::Closed => {
            if !closed && !closes(&mut stream).await {
                problems.push("connection kept open, expected closed".into());
            }
        }
        Conn::Tunnel => {}
    }
    for (name, expected) in case.echo {
        let received = answers.first().and_then(|a| {
            let json: serde_json::Value = serde_json::from_str(a.body.trim()).ok()?;
            Some(json["echo"][name].as_str().map(str::to_string))
        });
        match received {
            None => problems.push("no echo body".into()),
            Some(got) if got.as_deref() != *expected => problems.push(format!(
                "backend got {name}: {got:?}, expected {expected:?}"
            )),
            Some(_) => {}
        }
    }
    // The backend counts a request when it starts answering it: give a closed connection's
    // last request a moment.
    tokio::time::sleep(Duration::from_millis(50)).await;
    let seen = backend_requests(backend).await - before;
    if seen != forwarded && !(case.at_most && seen < forwarded) {
        problems.push(format!("backend saw {seen} requests, expected {forwarded}"));
    }
    (!problems.is_empty()).then(|| problems.join("; "))
}

#[tokio::test]
async fn smuggling_corpus_is_refused_or_reframed() {
    let backend = backend("app", 0);
    let lb = balancer_with(&config(backend.addr), 1);
    let corpus = corpus();
    assert!(corpus.len() >= 40, "corpus of {}", corpus.len());
    let mut failures = Vec::new();
    for case in &corpus {
        if let Some(problem) = run(case, lb.addr, backend.addr).await {
            failures.push(format!("{}: {problem}", case.name));
        }
    }
    assert!(
        failures.is_empty(),
        "{} of {} cases failed:\n{}",
        failures.len(),
        corpus.len(),
        failures.join("\n")
    );
}

/// How Fulcrum answered stream 1 of a raw HTTP/2 connection.
#[derive(Debug, PartialEq)]
enum H2 {
    /// A response head with this status (those of HPACK's static table only: 200, 400, ...).
    Status(u16),
    /// A response head with a status outside the static table.
    OtherStatus,
    /// RST_STREAM with this error code (1: PROTOCOL_ERROR): the stream is malformed.
    Reset(u32),
    /// GOAWAY with this error code: the h2 crate closes the whole connection.
    GoAway(u32),
    /// Nothing within a few seconds.
    Silent,
}

/// An HTTP/2 case: name, HEADERS fields, DATA, answer, requests the backend sees.
type H2Case = (
    &'static str,
    Vec<(&'static str, &'static str)>,
    Option<&'static [u8]>,
    H2,
    u64,
);

/// An HTTP/2 frame: length, type, flags, stream, payload.
fn frame(kind: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
    let mut frame = (payload.len() as u32).to_be_bytes()[1..].to_vec();
    frame.extend_from_slice(&[kind, flags]);
    frame.extend_from_slice(&stream.to_be_bytes());
    frame.extend_from_slice(payload);
    frame
}

/// An HPACK header block of literal fields (not indexed, no Huffman), in order.
fn hpack(fields: &[(&str, &str)]) -> Vec<u8> {
    let mut block = Vec::new();
    for (name, value) in fields {
        assert!(name.len() < 127 && value.len() < 127);
        block.push(0x00);
        block.push(name.len() as u8);
        block.extend_from_slice(name.as_bytes());
        block.push(value.len() as u8);
        block.extend_from_slice(value.as_bytes());
    }
    block
}

/// Sends one request on a new prior-knowledge HTTP/2 connection: `fields` as its HEADERS
/// and, when given, `data` as one DATA frame; returns the answer on stream 1 and the DATA
/// Fulcrum sent on it.
async fn h2_request(
    lb: std::net::SocketAddr,
    fields: &[(&str, &str)],
    data: Option<&[u8]>,
) -> (H2, Vec<u8>) {
    let mut stream = TcpStream::connect(lb).await.unwrap();
    let mut out = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".to_vec();
    out.extend(frame(4, 0, 0, &[]));
    // END_HEADERS, and END_STREAM unless data follows.
    let flags = if data.is_some() { 0x4 } else { 0x5 };
    out.extend(frame(1, flags, 1, &hpack(fields)));
    if let Some(data) = data {
        out.extend(frame(0, 0x1, 1, data));
    }
    stream.write_all(&out).await.unwrap();
    let mut input = Vec::new();
    let mut answer = None;
    let mut body = Vec::new();
    loop {
        while input.len() >= 9 {
            let len = u32::from_be_bytes([0, input[0], input[1], input[2]]) as usize;
            if input.len() < 9 + len {
                break;
            }
            let (kind, flags) = (input[3], input[4]);
            let id = u32::from_be_bytes([input[5], input[6], input[7], input[8]]) & 0x7fff_ffff;
            let payload: Vec<u8> = input[9..9 + len].to_vec();
            input.drain(..9 + len);
            match (kind, id) {
                (4, 0) if flags & 1 == 0 => {
                    stream.write_all(&frame(4, 1, 0, &[])).await.unwrap();
                }
                (1, 1) => {
                    let status = match payload.first() {
                        Some(&b) if (0x88..=0x8e).contains(&b) => {
                            H2::Status([200, 204, 206, 304, 400, 404, 500][(b - 0x88) as usize])
                        }
                        _ => H2::OtherStatus,
                    };
                    answer = Some(status);
                    if flags & 1 != 0 {
                        return (answer.unwrap(), body);
                    }
                }
                (0, 1) => {
                    body.extend_from_slice(&payload);
                    if flags & 1 != 0 {
                        return (answer.unwrap_or(H2::Silent), body);
                    }
                }
                (3, 1) => {
                    let code = u32::from_be_bytes(payload[..4].try_into().unwrap());
                    return (answer.unwrap_or(H2::Reset(code)), body);
                }
                (7, _) => {
                    let code = u32::from_be_bytes(payload[4..8].try_into().unwrap());
                    return (answer.unwrap_or(H2::GoAway(code)), body);
                }
                _ => {}
            }
        }
        let mut buffer = [0u8; 8192];
        match tokio::time::timeout(Duration::from_secs(3), stream.read(&mut buffer)).await {
            Ok(Ok(n)) if n > 0 => input.extend_from_slice(&buffer[..n]),
            _ => return (answer.unwrap_or(H2::Silent), body),
        }
    }
}

#[tokio::test]
async fn http2_pseudo_header_and_connection_header_abuse_is_refused() {
    let backend = backend("app", 0);
    let lb = balancer_with(&config(backend.addr), 1);
    const GET: [(&str, &str); 4] = [
        (":method", "GET"),
        (":scheme", "http"),
        (":path", "/?echo=headers"),
        (":authority", "good.test"),
    ];
    let with = |extra: &[(&'static str, &'static str)]| {
        let mut fields = GET.to_vec();
        fields.extend_from_slice(extra);
        fields
    };
    let without = |name: &str| GET.iter().copied().filter(|(n, _)| *n != name).collect();
    let mut pseudo_late = vec![("x-a", "1")];
    pseudo_late.extend_from_slice(&GET);
    let duplicate_path = with(&[(":path", "/other")]);
    // (name, HEADERS fields, DATA, answer, requests the backend sees)
    let cases: Vec<H2Case> = vec![
        ("plain GET", GET.to_vec(), None, H2::Status(200), 1),
        (
            "connection header",
            with(&[("connection", "keep-alive")]),
            None,
            H2::Reset(1),
            0,
        ),
        (
            "transfer-encoding header",
            with(&[("transfer-encoding", "chunked")]),
            None,
            H2::Reset(1),
            0,
        ),
        (
            "upgrade header",
            with(&[("upgrade", "h2c")]),
            None,
            H2::Reset(1),
            0,
        ),
        (
            "keep-alive header",
            with(&[("keep-alive", "timeout=5")]),
            None,
            H2::Reset(1),
            0,
        ),
        (
            "te other than trailers",
            with(&[("te", "gzip")]),
            None,
            H2::Reset(1),
            0,
        ),
        (
            "upper-case header name",
            with(&[("X-Upper", "1")]),
            None,
            H2::GoAway(1),
            0,
        ),
        (
            "CRLF in a header value",
            with(&[("x-a", "1\r\nx-injected: 2")]),
            None,
            H2::GoAway(1),
            0,
        ),
        (
            "pseudo-header after a regular header",
            pseudo_late,
            None,
            H2::Reset(1),
            0,
        ),
        ("missing :path", without(":path"), None, H2::Reset(1), 0),
        ("missing :method", without(":method"), None, H2::Reset(1), 0),
        ("duplicate :path", duplicate_path, None, H2::Reset(1), 0),
        (
            "unknown pseudo-header",
            with(&[(":foo", "bar")]),
            None,
            H2::GoAway(1),
            0,
        ),
        (
            "duplicate Host",
            with(&[("host", "good.test"), ("host", "evil.test")]),
            None,
            H2::Status(400),
            0,
        ),
        (
            "userinfo in :authority",
            {
                let mut f = without(":authority");
                f.push((":authority", "evil.test@good.test"));
                f
            },
            None,
            H2::Status(400),
            0,
        ),
        (
            "DATA longer than content-length",
            with(&[(":method", "POST"), ("content-length", "5")])
                .into_iter()
                .filter(|f| *f != (":method", "GET"))
                .collect(),
            Some(b"helloGET / HTTP/1.1\r\nHost: t\r\n\r\n".as_slice()),
            H2::Reset(1),
            0,
        ),
    ];
    let mut failures = Vec::new();
    for (name, fields, data, expected, forwarded) in &cases {
        let before = backend_requests(backend.addr).await;
        let (answer, _) = h2_request(lb.addr, fields, *data).await;
        tokio::time::sleep(Duration::from_millis(50)).await;
        let seen = backend_requests(backend.addr).await - before;
        if answer != *expected || seen != *forwarded {
            failures.push(format!(
                "{name}: {answer:?} (backend saw {seen}), expected {expected:?} ({forwarded})"
            ));
        }
    }
    // :authority wins over a different Host: the backend's Host is the authority.
    let (answer, body) = h2_request(lb.addr, &with(&[("host", "evil.test")]), None).await;
    let json: serde_json::Value = serde_json::from_slice(&body).unwrap_or_default();
    if answer != H2::Status(200) || json["echo"]["host"] != "good.test" {
        failures.push(format!(
            ":authority vs Host: {answer:?}, backend got Host {}",
            json["echo"]["host"]
        ));
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

#[tokio::test]
async fn allowed_upgrades_pass_other_protocols_but_never_h2c() {
    let backend = backend("app", 0);
    let config = format!(
        "{}\n[listeners.open]\nlisten = \"127.0.0.1:0\"\nprotocol = \"http\"\npool = \"app\"\n\
         allowed_upgrades = [\"websocket\", \"Foo\", \"h2c\"]\n",
        config(backend.addr)
    );
    let lb = balancer_with(&config, 2);
    let open = lb.listeners["open"];
    let upgrade = |value: &str| {
        format!("GET /?echo=headers HTTP/1.1\r\nHost: t\r\nConnection: upgrade\r\nUpgrade: {value}\r\n\r\n")
    };
    let cases = [
        // The backend answers 200, not 101: a refused upgrade, served as an ordinary answer.
        echo(
            case("listed protocol", upgrade("foo/2"), &[200], Conn::Open, 1),
            &[("upgrade", Some("foo/2")), ("connection", Some("upgrade"))],
        ),
        echo(
            case("h2c, even listed", upgrade("h2c"), &[200], Conn::Open, 1),
            &[("upgrade", None)],
        ),
        echo(
            case(
                "listed among others",
                upgrade("h2c, bar, FOO"),
                &[200],
                Conn::Open,
                1,
            ),
            &[("upgrade", Some("FOO"))],
        ),
    ];
    for case in &cases {
        if let Some(problem) = run(case, open, backend.addr).await {
            panic!("{}: {problem}", case.name);
        }
    }
    // The default listener does not pass `foo`.
    let plain = echo(
        case("unlisted", upgrade("foo"), &[200], Conn::Open, 1),
        &[("upgrade", None)],
    );
    assert_eq!(run(&plain, lb.listeners["web"], backend.addr).await, None);
}

#[tokio::test]
async fn http2_body_without_content_length_is_cut_off_past_max_body_bytes() {
    let backend = backend("app", 0);
    let lb = balancer_with(&config(backend.addr), 1);
    let post = [
        (":method", "POST"),
        (":scheme", "http"),
        (":path", "/"),
        (":authority", "good.test"),
    ];
    // At the limit (1024, no content-length): forwarded.
    let (answer, _) = h2_request(lb.addr, &post, Some(&[b'a'; 1024])).await;
    assert_eq!(answer, H2::Status(200));
    // One byte over: counted while streaming, cut off, 413 (outside HPACK's static table).
    let (answer, body) = h2_request(lb.addr, &post, Some(&[b'a'; 1025])).await;
    assert_eq!(answer, H2::OtherStatus);
    assert!(
        body.starts_with(b"413 "),
        "{}",
        String::from_utf8_lossy(&body)
    );
    // The backend answered the first; the second's request, if its head got there, was
    // aborted before its body (it never sees the whole of it).
    let seen = backend_requests(backend.addr).await;
    assert!((1..=2).contains(&seen), "{seen}");
}
