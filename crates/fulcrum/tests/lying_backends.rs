//! Lying and failing backends: one raw-TCP [`ScriptedBackend`] answers Fulcrum with a table
//! of hostile or broken replies (garbage status lines, invalid header bytes, oversized heads,
//! wrong `Content-Length`, broken chunking, early closes, 1xx floods, unsolicited bytes, two
//! answers to one request, HTTP/0.9 and HTTP/2 from an HTTP/1.1 backend). Each case asserts
//! what a raw HTTP/1.1 client sees (and for the important ones an HTTP/2 client too):
//!
//! - Fulcrum's own 502 (504 for a stall) when no response head was sent to the client yet;
//! - once the head was sent, a clean abort: HTTP/1 connection closed short of the framing
//!   (never a well-framed truncated body), HTTP/2 stream reset;
//! - a lie that still frames a whole answer is passed on, and whatever the backend sent
//!   beyond it never answers a later request (the upstream connection is dropped);
//! - the backend's failure counter (admin API) rises for every failure;
//! - a normal client on a second, healthy pool sees 100% success meanwhile.
//!
//! Then retries (only an idempotent request, only before any byte reached the client) and
//! passive ejection of the lying backend in a mixed pool.

mod common;

use std::time::Duration;

use common::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// What a client must see for one request.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Outcome {
    /// Fulcrum's own answer with this status (its one-line body), well framed.
    Fulcrum(u16),
    /// The backend's answer passed on: status 200 with this body, well framed.
    Passed(&'static str),
    /// The head was (or may have been) sent, then the connection (HTTP/2: the stream) ended
    /// short of the framing: never a complete response.
    Abort,
}

/// One case of the corpus.
struct Case {
    name: &'static str,
    script: Script,
    /// What the HTTP/1.1 client sees.
    h1: Outcome,
    /// What a second request on the same client connection sees (same worker, so the same
    /// upstream idle queue: a connection left with the backend's extra bytes would answer it).
    again: Option<Outcome>,
    /// Connections the backend must have accepted for the case (HTTP/1.1 requests only).
    connections: Option<usize>,
    /// Whether the backend's failure counter must rise (else: must not).
    failure: bool,
    /// What an HTTP/2 (prior knowledge) client sees, for the important cases.
    h2: Option<Outcome>,
}

fn case(name: &'static str, reply: impl AsRef<[u8]>, after: After, h1: Outcome) -> Case {
    Case {
        name,
        script: Script {
            eager: Vec::new(),
            reply: Some(reply.as_ref().to_vec()),
            after,
        },
        h1,
        again: None,
        connections: None,
        failure: !matches!(h1, Outcome::Passed(_)),
        h2: None,
    }
}

impl Case {
    fn h2(mut self, outcome: Outcome) -> Self {
        self.h2 = Some(outcome);
        self
    }
    fn again(mut self, outcome: Outcome, connections: usize) -> Self {
        self.again = Some(outcome);
        self.connections = Some(connections);
        self
    }
}

const OK: &str = "HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhello";
/// [`OK`] closing: the backend closes after it, so Fulcrum must not pool the connection (a
/// pooled one closing just as the next case reuses it would fail that case's request).
const OK_CLOSE: &str = "HTTP/1.1 200 OK\r\nContent-Length: 5\r\nConnection: close\r\n\r\nhello";
const SMUGGLED: &str = "HTTP/1.1 200 OK\r\nContent-Length: 7\r\n\r\nsmuggle";

fn corpus() -> Vec<Case> {
    use After::*;
    use Outcome::*;
    let huge_head = format!(
        "HTTP/1.1 200 OK\r\nX-Big: {}\r\nContent-Length: 5\r\n\r\nhello",
        "a".repeat(1 << 20)
    );
    // hyper's client reads a response head of up to ~400 KiB (its `max_buf_size` default,
    // 8 KiB + 100 × 4 KiB) and 100 header lines.
    let big_head = format!(
        "HTTP/1.1 200 OK\r\nX-Big: {}\r\nContent-Length: 5\r\nConnection: close\r\n\r\nhello",
        "a".repeat(300_000)
    );
    let endless = "HTTP/1.1 100 Continue\r\n\r\n".repeat(100_000);
    let many_headers = format!(
        "HTTP/1.1 200 OK\r\n{}Content-Length: 5\r\n\r\nhello",
        (0..200)
            .map(|i| format!("X-H{i}: v\r\n"))
            .collect::<String>()
    );
    let continues = "HTTP/1.1 100 Continue\r\n\r\n".repeat(1000) + OK_CLOSE;
    let hints =
        "HTTP/1.1 103 Early Hints\r\nLink: </a.css>; rel=preload\r\n\r\n".repeat(1000) + OK_CLOSE;
    let mut silent_close = case("close before any byte", "", Close, Fulcrum(502)).h2(Fulcrum(502));
    silent_close.script.reply = None;
    let mut stall = case("stall before any byte", "", Stall, Fulcrum(504));
    stall.script.reply = None;
    let mut eager = case(
        "garbage sent on accept, before any request",
        "",
        Close,
        Fulcrum(502),
    );
    eager.script.eager = b"\x00\x01garbage\r\n\r\n".to_vec();
    eager.script.reply = None;
    vec![
        case("baseline: a well-framed keep-alive answer", OK, KeepAlive, Passed("hello"))
            .again(Passed("hello"), 1)
            .h2(Passed("hello")),
        case("garbage status line", "FOO BAR BAZ\r\n\r\n", Close, Fulcrum(502)).h2(Fulcrum(502)),
        case("non-numeric status code", "HTTP/1.1 2x0 OK\r\nContent-Length: 0\r\n\r\n", Close, Fulcrum(502)),
        case("status code out of range", "HTTP/1.1 1000 OK\r\nContent-Length: 0\r\n\r\n", Close, Fulcrum(502)),
        case("NUL in a header value", "HTTP/1.1 200 OK\r\nX-A: 1\x002\r\nContent-Length: 5\r\n\r\nhello", Close, Fulcrum(502)).h2(Fulcrum(502)),
        case("bare CR in a header value", "HTTP/1.1 200 OK\r\nX-A: 1\rX-B: 2\r\nContent-Length: 5\r\n\r\nhello", Close, Fulcrum(502)),
        case("space in a header name", "HTTP/1.1 200 OK\r\nX A: 1\r\nContent-Length: 5\r\n\r\nhello", Close, Fulcrum(502)),
        case("non-token byte in a header name", "HTTP/1.1 200 OK\r\nX\"A: 1\r\nContent-Length: 5\r\n\r\nhello", Close, Fulcrum(502)),
        case("header line without colon", "HTTP/1.1 200 OK\r\nX-A\r\nContent-Length: 5\r\n\r\nhello", Close, Fulcrum(502)),
        case("conflicting Content-Length", "HTTP/1.1 200 OK\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\nhello!", Close, Fulcrum(502)),
        case("response head of 300 kB", &big_head, Close, Passed("hello")),
        case("response head of 1 MiB", &huge_head, Close, Fulcrum(502)).h2(Fulcrum(502)),
        case("200 header lines", &many_headers, Close, Fulcrum(502)),
        case("Content-Length shorter than the body, connection kept",
            format!("HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhelloEXTRA-BYTES-{SMUGGLED}"), KeepAlive, Passed("hello"))
            .again(Passed("hello"), 2),
        case("two responses for one request", format!("{OK}{SMUGGLED}"), KeepAlive, Passed("hello"))
            .again(Passed("hello"), 2)
            .h2(Passed("hello")),
        case("Content-Length longer than the body, then close",
            "HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\nhello", Close, Abort).h2(Abort),
        case("chunked, closed mid-chunk",
            "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhel", Close, Abort).h2(Abort),
        case("chunked, closed after a whole chunk, no last chunk",
            "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n", Close, Abort).h2(Abort),
        case("chunked, invalid chunk size",
            "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\nzz\r\nhello\r\n0\r\n\r\n", KeepAlive, Abort),
        case("chunked, overflowing chunk size",
            "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nfffffffffffffffffffff\r\nhello\r\n0\r\n\r\n", KeepAlive, Abort),
        case("close mid-body without framing (read to EOF) is complete",
            "HTTP/1.1 200 OK\r\n\r\nhello", Close, Passed("hello")),
        silent_close,
        stall,
        // Interim answers are read and dropped (never forwarded); their number is not limited,
        // their time is: the final head must come within `timeouts.request` (1 s here).
        case("1000 x 100 Continue, then an answer", &continues, Close, Passed("hello")).h2(Passed("hello")),
        case("1000 x 103 Early Hints, then an answer", &hints, Close, Passed("hello")),
        case("endless 100 Continue", &endless, Stall, Fulcrum(504)).h2(Fulcrum(504)),
        case("HTTP/0.9 answer (no status line)", "hello world\n", Close, Fulcrum(502)),
        case("HTTP/2 preface from an HTTP/1.1 backend",
            b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\x00\x00\x00\x04\x00\x00\x00\x00\x00", Close, Fulcrum(502)).h2(Fulcrum(502)),
        case("unsolicited bytes on a pooled idle connection", OK, Unsolicited(SMUGGLED.into()), Passed("hello"))
            .again(Passed("hello"), 2),
        eager,
    ]
}

/// What a raw HTTP/1.1 client read for one request.
#[derive(Debug)]
struct Got {
    status: Option<u16>,
    body: Vec<u8>,
    /// The response was complete by its framing.
    complete: bool,
    /// The connection closed (EOF or reset).
    closed: bool,
}

/// Where a chunked body starting at `data` ends (after the last chunk), if it does.
fn chunked_end(data: &[u8]) -> Option<(usize, Vec<u8>)> {
    let mut at = 0;
    let mut body = Vec::new();
    loop {
        let line = data[at..].windows(2).position(|w| w == b"\r\n")?;
        let size = std::str::from_utf8(&data[at..at + line]).ok()?;
        let size = usize::from_str_radix(size.split(';').next()?.trim(), 16).ok()?;
        at += line + 2;
        if size == 0 {
            return data[at..].starts_with(b"\r\n").then_some((at + 2, body));
        }
        if data.len() < at + size + 2 {
            return None;
        }
        body.extend_from_slice(&data[at..at + size]);
        at += size + 2;
    }
}

/// Reads one response (1xx skipped) from `stream`, until complete or closed (5 s at most).
async fn read_one(stream: &mut TcpStream) -> Got {
    let mut data = Vec::new();
    let mut closed = false;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    loop {
        // Skip complete 1xx heads.
        while let Some(end) = data.windows(4).position(|w| w == b"\r\n\r\n") {
            if data.starts_with(b"HTTP/1.1 1") {
                data.drain(..end + 4);
            } else {
                break;
            }
        }
        if let Some(end) = data.windows(4).position(|w| w == b"\r\n\r\n") {
            let head = String::from_utf8_lossy(&data[..end]).into_owned();
            let status = head.split(' ').nth(1).and_then(|s| s.parse().ok());
            let header = |name: &str| {
                head.lines().skip(1).find_map(|line| {
                    let (n, v) = line.split_once(':')?;
                    n.trim()
                        .eq_ignore_ascii_case(name)
                        .then(|| v.trim().to_string())
                })
            };
            let rest = &data[end + 4..];
            let framed = if let Some(length) = header("content-length") {
                let length: usize = length.parse().unwrap();
                (rest.len() >= length).then(|| rest[..length].to_vec())
            } else if header("transfer-encoding").is_some() {
                chunked_end(rest).map(|(_, body)| body)
            } else if closed {
                Some(rest.to_vec())
            } else {
                None
            };
            if let Some(body) = framed {
                return Got {
                    status,
                    body,
                    complete: true,
                    closed,
                };
            }
            if closed {
                return Got {
                    status,
                    body: rest.to_vec(),
                    complete: false,
                    closed,
                };
            }
        } else if closed {
            return Got {
                status: None,
                body: data,
                complete: false,
                closed,
            };
        }
        let mut buffer = [0u8; 16384];
        match tokio::time::timeout_at(deadline, stream.read(&mut buffer)).await {
            Ok(Ok(0) | Err(_)) => closed = true,
            Ok(Ok(n)) => data.extend_from_slice(&buffer[..n]),
            Err(_) => panic!("no complete response nor close in 5 s: {data:?}"),
        }
    }
}

/// Whether `got` is `outcome`; else what it was.
fn check(got: &Got, outcome: Outcome) -> Result<(), String> {
    let ok = match outcome {
        Outcome::Fulcrum(status) => {
            got.complete
                && got.status == Some(status)
                && got.body.starts_with(status.to_string().as_bytes())
        }
        Outcome::Passed(body) => {
            got.complete && got.status == Some(200) && got.body == body.as_bytes()
        }
        Outcome::Abort => got.closed && !got.complete,
    };
    ok.then_some(()).ok_or_else(|| {
        format!(
            "got status {:?}, body {:?}, complete {}, closed {}",
            got.status,
            String::from_utf8_lossy(&got.body[..got.body.len().min(80)]),
            got.complete,
            got.closed
        )
    })
}

/// One HTTP/2 request to `url`; whether it was `outcome`.
async fn check_h2(client: &reqwest::Client, url: &str, outcome: Outcome) -> Result<(), String> {
    let response = client.get(url).send().await;
    let got = match response {
        // The stream was reset before its head reached the client: an abort too.
        Err(_) if outcome == Outcome::Abort => return Ok(()),
        Err(error) => return Err(format!("request failed: {error}")),
        Ok(response) => (response.status().as_u16(), response.bytes().await),
    };
    let ok = match (outcome, &got) {
        (Outcome::Fulcrum(status), (s, Ok(body))) => {
            *s == status && body.starts_with(status.to_string().as_bytes())
        }
        (Outcome::Passed(expected), (200, Ok(body))) => body == expected.as_bytes(),
        (Outcome::Abort, (200, Err(_))) => true,
        _ => false,
    };
    ok.then_some(()).ok_or_else(|| {
        format!(
            "HTTP/2 got {:?}",
            (
                got.0,
                got.1.map(|b| String::from_utf8_lossy(&b).into_owned())
            )
        )
    })
}

/// The failure counter of backend `address` in pool `pool` (admin API).
async fn failures(lb: &Proc, pool: &str, address: std::net::SocketAddr) -> u64 {
    let json = admin_get(lb, &format!("/api/pools/{pool}")).await;
    json["backends"]
        .as_array()
        .unwrap()
        .iter()
        .find(|b| b["address"] == address.to_string())
        .map(|b| b["failures"].as_u64().unwrap())
        .unwrap()
}

const GET: &[u8] = b"GET / HTTP/1.1\r\nHost: t\r\n\r\n";

async fn run(case: &Case, lb: &Proc, liar: &ScriptedBackend, h2: &reqwest::Client) -> Vec<String> {
    let mut problems = Vec::new();
    let addr = lb.listeners["lying"];
    liar.set(case.script.clone());
    let failures_before = failures(lb, "lying", liar.addr).await;
    let accepted_before = liar.accepted();
    let mut stream = TcpStream::connect(addr).await.unwrap();
    stream.write_all(GET).await.unwrap();
    let got = read_one(&mut stream).await;
    if let Err(problem) = check(&got, case.h1) {
        problems.push(format!("HTTP/1.1: {problem}"));
    }
    if let Some(again) = case.again {
        if let After::Unsolicited(_) = case.script.after {
            let late = liar.late_writes.load(std::sync::atomic::Ordering::SeqCst);
            let sent = eventually(Duration::from_secs(3), || async {
                liar.late_writes.load(std::sync::atomic::Ordering::SeqCst) > late
            })
            .await;
            assert!(
                sent,
                "{}: the backend's unsolicited bytes were not sent",
                case.name
            );
        }
        if got.closed {
            problems.push("client connection closed after the first answer".into());
        } else {
            stream.write_all(GET).await.unwrap();
            let got = read_one(&mut stream).await;
            if let Err(problem) = check(&got, again) {
                problems.push(format!("second request: {problem}"));
            }
        }
    }
    drop(stream);
    if let Some(expected) = case.connections {
        let accepted = liar.accepted() - accepted_before;
        if accepted != expected {
            problems.push(format!(
                "backend accepted {accepted} connections, expected {expected}"
            ));
        }
    }
    // A failure mid-body is counted when Fulcrum reads it: give it a moment to.
    let url = format!("http://{addr}/");
    let as_expected = eventually(Duration::from_secs(2), || async {
        (failures(lb, "lying", liar.addr).await > failures_before) == case.failure
    })
    .await;
    if !as_expected {
        problems.push(if case.failure {
            "backend failure counter did not rise".into()
        } else {
            "backend failure counter rose".into()
        });
    }
    if let Some(outcome) = case.h2 {
        if let Err(problem) = check_h2(h2, &url, outcome).await {
            problems.push(problem);
        }
    }
    problems
}

fn config(liar: std::net::SocketAddr, good: std::net::SocketAddr) -> String {
    format!(
        "[admin]\nlisten = \"127.0.0.1:0\"\n\n\
         [listeners.lying]\nlisten = \"127.0.0.1:0\"\nprotocol = \"http\"\npool = \"lying\"\n\n\
         [listeners.good]\nlisten = \"127.0.0.1:0\"\nprotocol = \"http\"\npool = \"good\"\n\n\
         [listeners.mixed]\nlisten = \"127.0.0.1:0\"\nprotocol = \"http\"\npool = \"mixed\"\n\n\
         [pools.lying]\nbackends = [\"{liar}\"]\nmax_attempts = 1\nfailure_backoff = \"0s\"\n\n\
         [pools.lying.passive]\nenabled = false\n\n\
         [pools.lying.timeouts]\nrequest = \"1s\"\n\n\
         [pools.good]\nbackends = [\"{good}\"]\n\n\
         [pools.mixed]\nbackends = [\"{liar}\", \"{good}\"]\nalgorithm = \"round_robin\"\n\
         failure_backoff = \"0s\"\n\n\
         [pools.mixed.passive]\nconsecutive_failures = 3\nejection_time = \"30s\"\n\
         max_ejected_percent = 50\n"
    )
}

#[tokio::test]
async fn lying_backends_get_502_or_a_clean_abort_and_hurt_nobody_else() {
    let liar = ScriptedBackend::start(Script::default());
    let good = backend("good", 0);
    let lb = balancer_with(&config(liar.addr, good.addr), 3);
    let h2 = reqwest::Client::builder()
        .no_proxy()
        .tls_backend_preconfigured(plain_tls_config())
        .http2_prior_knowledge()
        .timeout(Duration::from_secs(10))
        .build()
        .unwrap();
    // A normal client on the healthy pool all along.
    let load = Load::start(
        &format!("http://{}/", lb.listeners["good"]),
        4,
        Duration::from_secs(60),
    );
    let corpus = corpus();
    let mut failures = Vec::new();
    for case in &corpus {
        let problems = run(case, &lb, &liar, &h2).await;
        if !problems.is_empty() {
            failures.push(format!("{}: {}", case.name, problems.join("; ")));
        }
    }
    let report = load.stop().await;
    assert!(report.total() > 0);
    assert!(
        report.failures.is_empty(),
        "the normal client failed: {:?}",
        &report.failures[..report.failures.len().min(5)]
    );
    let logs = lb.logs();
    assert!(
        logs.contains("backend failed before answering") && logs.contains("failed mid-stream"),
        "{logs}"
    );
    assert!(
        failures.is_empty(),
        "{} of {} cases failed:\n{}\nlog:\n{}",
        failures.len(),
        corpus.len(),
        failures.join("\n"),
        logs.lines()
            .filter(|l| l.contains("WARN"))
            .collect::<Vec<_>>()
            .join("\n")
    );
}

/// A mixed pool (the liar and a good backend, round robin, up to 3 attempts): an idempotent
/// request that failed before any answer is retried on the good backend; a POST with a body
/// is not (502); after 3 failures in a row passive ejection takes the liar out.
#[tokio::test]
async fn failures_are_retried_only_when_safe_and_eject_the_liar() {
    let liar = ScriptedBackend::start(Script::default());
    let good = backend("good", 0);
    let lb = balancer_with(&config(liar.addr, good.addr), 3);
    let url = format!("http://{}/", lb.listeners["mixed"]);
    let client = client();
    // Every attempt on the liar: it reads the request, then closes without a byte.
    for _ in 0..2 {
        let response = client.get(&url).send().await.unwrap();
        assert_eq!(response.status(), 200, "GET is retried on the good backend");
    }
    assert!(liar.accepted() >= 1, "the liar was tried");
    let mut statuses = Vec::new();
    for _ in 0..4 {
        let response = client.post(&url).body("hello").send().await.unwrap();
        statuses.push(response.status().as_u16());
    }
    assert!(
        statuses.contains(&502),
        "a POST is not retried: {statuses:?}"
    );
    let ejected = eventually(Duration::from_secs(3), || async {
        let json = admin_get(&lb, "/api/pools/mixed").await;
        json["backends"]
            .as_array()
            .unwrap()
            .iter()
            .any(|b| b["address"] == liar.addr.to_string() && b["ejected"] == true)
    })
    .await;
    assert!(ejected, "{}", lb.logs());
    let (counts, failures) = spread(&url, 20, 2).await;
    assert!(failures.is_empty(), "{failures:?}");
    assert_eq!(counts.get("good"), Some(&20));
}

/// A backend whose heads are fine but whose bodies always break (cut short of their
/// `Content-Length`) is ejected too: each broken body counts in its passive streak (at its
/// next answer, as its head had counted as a success), and only a whole answer resets it.
#[tokio::test]
async fn bodies_broken_after_the_head_count_toward_passive_ejection() {
    let liar = ScriptedBackend::start(Script {
        eager: Vec::new(),
        reply: Some(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\nhello".to_vec()),
        after: After::Close,
    });
    let good = backend("good", 0);
    let lb = balancer_with(&config(liar.addr, good.addr), 3);
    let url = format!("http://{}/", lb.listeners["mixed"]);
    let client = client();
    let is_ejected = || async {
        let json = admin_get(&lb, "/api/pools/mixed").await;
        json["backends"]
            .as_array()
            .unwrap()
            .iter()
            .any(|b| b["address"] == liar.addr.to_string() && b["ejected"] == true)
    };
    let mut broken = 0;
    for _ in 0..20 {
        if is_ejected().await {
            break;
        }
        // A broken body: an error reading it, or (reset before the head got out) sending.
        match client.get(&url).send().await {
            Ok(response) => {
                assert_eq!(response.status(), 200);
                if response.bytes().await.is_err() {
                    broken += 1;
                }
            }
            Err(_) => broken += 1,
        }
    }
    assert!(
        is_ejected().await,
        "not ejected after {broken} broken bodies"
    );
    assert!((3..=5).contains(&broken), "{broken} broken bodies");
    assert!(failures(&lb, "mixed", liar.addr).await >= broken);
}
