//! `fulcrum ctl` end to end: the real binary against a running balancer's admin API.

mod common;

use std::time::Duration;

use common::*;

/// What one `fulcrum ctl` run produced.
#[derive(Debug)]
struct Ctl {
    code: Option<i32>,
    stdout: String,
    stderr: String,
}

/// Runs `fulcrum ctl ARGS` (bounded), with FULCRUM_ADMIN / FULCRUM_TOKEN only from `env`.
async fn ctl_env(args: &[&str], env: &[(&str, &str)]) -> Ctl {
    let mut command = tokio::process::Command::new(fulcrum_bin());
    command
        .arg("ctl")
        .args(args)
        .env_remove("FULCRUM_ADMIN")
        .env_remove("FULCRUM_TOKEN")
        .env_remove("FULCRUM_CA")
        .envs(env.iter().copied())
        .kill_on_drop(true);
    let output = tokio::time::timeout(Duration::from_secs(20), command.output())
        .await
        .unwrap_or_else(|_| panic!("fulcrum ctl {args:?} did not finish"))
        .expect("fulcrum ctl runs");
    Ctl {
        code: output.status.code(),
        stdout: String::from_utf8_lossy(&output.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&output.stderr).into_owned(),
    }
}

/// Runs `fulcrum ctl --admin URL ARGS` against `lb` and asserts it succeeded.
async fn ctl_ok(lb: &Proc, args: &[&str]) -> String {
    let admin = lb.admin_url();
    let mut all = vec!["--admin", admin.as_str()];
    all.extend_from_slice(args);
    let out = ctl_env(&all, &[]).await;
    assert_eq!(out.code, Some(0), "fulcrum ctl {args:?}: {out:?}");
    assert!(out.stderr.is_empty(), "fulcrum ctl {args:?}: {out:?}");
    out.stdout
}

/// Runs `fulcrum ctl --admin URL ARGS` against `lb` and asserts it failed with one line.
async fn ctl_fails(lb: &Proc, args: &[&str]) -> String {
    let admin = lb.admin_url();
    let mut all = vec!["--admin", admin.as_str()];
    all.extend_from_slice(args);
    let out = ctl_env(&all, &[]).await;
    assert_eq!(out.code, Some(1), "fulcrum ctl {args:?}: {out:?}");
    assert_eq!(out.stderr.lines().count(), 1, "{out:?}");
    assert!(out.stdout.is_empty(), "{out:?}");
    out.stderr
}

/// The table row (whitespace-split cells) whose first cell is `key`.
fn row(table: &str, key: &str) -> Vec<String> {
    table
        .lines()
        .map(|l| l.split_whitespace().map(str::to_string).collect::<Vec<_>>())
        .find(|cells| cells.first().map(String::as_str) == Some(key))
        .unwrap_or_else(|| panic!("no row {key} in\n{table}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ctl_shows_tables_and_json_and_reports_api_errors() {
    let (a, b) = (backend("a", 0), backend("b", 0));
    let lb = balancer(&[(a.addr, 1), (b.addr, 2)], "algorithm = \"round_robin\"");
    let (_, failures) = spread(&format!("http://{}/", lb.addr), 30, 3).await;
    assert!(failures.is_empty(), "{failures:?}");

    let pools = ctl_ok(&lb, &["pools"]).await;
    assert!(pools.starts_with("POOL "), "{pools}");
    let app = row(&pools, "app");
    assert_eq!(
        [&app[0], &app[1], &app[2], &app[4]],
        ["app", "round_robin", "2/2", "30"],
        "{pools}"
    );

    let table = ctl_ok(&lb, &["backends", "app"]).await;
    let header: Vec<&str> = table.lines().next().unwrap().split_whitespace().collect();
    assert_eq!(
        header,
        [
            "ADDRESS",
            "STATE",
            "HEALTH",
            "WEIGHT",
            "IN-FLIGHT",
            "REQUESTS",
            "ERRORS",
            "LATENCY"
        ]
    );
    let a_row = row(&table, &a.addr.to_string());
    let b_row = row(&table, &b.addr.to_string());
    assert_eq!(&a_row[1..4], ["active", "up", "1/1"], "{table}");
    assert_eq!(&b_row[1..4], ["active", "up", "2/2"], "{table}");
    assert_eq!(
        (&a_row[5], &a_row[6]),
        (&"10".to_string(), &"0".to_string())
    );
    assert_eq!(
        (&b_row[5], &b_row[6]),
        (&"20".to_string(), &"0".to_string())
    );
    // Columns line up: every row's STATE starts under the header's.
    let state_at = table.lines().next().unwrap().find("STATE").unwrap();
    for line in table.lines().skip(1) {
        let first_end = line.find(' ').unwrap();
        let second = first_end + line[first_end..].find(|c: char| c != ' ').unwrap();
        assert_eq!(second, state_at, "{table}");
    }

    // --json is the API's JSON.
    let json: serde_json::Value =
        serde_json::from_str(&ctl_ok(&lb, &["--json", "pools"]).await).expect("pools --json");
    assert_eq!(json[0]["name"], "app");
    assert_eq!(json[0]["backends"].as_array().unwrap().len(), 2);
    let json: serde_json::Value =
        serde_json::from_str(&ctl_ok(&lb, &["backends", "app", "--json"]).await).unwrap();
    assert_eq!(json["algorithm"], "round_robin");

    // API errors: one line, exit 1.
    let error = ctl_fails(&lb, &["backends", "nope"]).await;
    assert!(error.contains("404") && error.contains("nope"), "{error}");
    let error = ctl_fails(&lb, &["add", "app", "nowhere"]).await;
    assert!(
        error.contains("400") && error.contains("address"),
        "{error}"
    );
    let error = ctl_fails(&lb, &["weight", "app", "127.0.0.1:1", "2"]).await;
    assert!(error.contains("not in the pool"), "{error}");
    let error = ctl_fails(&lb, &["add", "app", &a.addr.to_string()]).await;
    assert!(error.contains("already"), "{error}");

    // Reload with an unchanged file; the reload shows up in the events.
    assert!(ctl_ok(&lb, &["reload"]).await.starts_with("reloaded"));
    let events = ctl_ok(&lb, &["events", "--limit", "5"]).await;
    assert!(events.starts_with("TIME "), "{events}");
    assert!(events.contains("reload"), "{events}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ctl_changes_membership_weight_and_state() {
    let (a, b, c) = (backend("a", 0), backend("b", 0), backend("c", 0));
    let lb = balancer(&[(a.addr, 1), (b.addr, 1)], "algorithm = \"round_robin\"");
    let (a_id, b_id, c_id) = (a.addr.to_string(), b.addr.to_string(), c.addr.to_string());
    let load = Load::start(&format!("http://{}/", lb.addr), 8, Duration::from_secs(15));
    assert!(
        load.wait_for(Duration::from_secs(5), |r| r.total() > 50)
            .await
    );

    // add: c takes traffic.
    let added = ctl_ok(&lb, &["add", "app", &c_id, "--weight", "2"]).await;
    assert!(added.contains(&c_id), "{added}");
    assert!(
        load.wait_for(Duration::from_secs(2), |r| r
            .counts
            .get("c")
            .copied()
            .unwrap_or(0)
            > 10)
            .await,
        "the added backend got no traffic"
    );
    assert_eq!(app_backends(&lb).await[&c_id]["weight"], 2);

    // weight.
    ctl_ok(&lb, &["weight", "app", &a_id, "5"]).await;
    assert!(
        eventually(Duration::from_secs(3), || async {
            app_backends(&lb).await[&a_id]["effective_weight"] == 5
        })
        .await
    );
    assert_eq!(
        row(&ctl_ok(&lb, &["backends", "app"]).await, &a_id)[3],
        "5/5"
    );

    // drain, maint, activate.
    ctl_ok(&lb, &["drain", "app", &b_id]).await;
    assert_eq!(app_backends(&lb).await[&b_id]["state"], "draining");
    let drained_at = load.count("b");
    assert!(
        load.wait_for(Duration::from_secs(3), |r| r.total() > 200)
            .await,
        "load stalled"
    );
    // At most the requests already in flight when it was drained.
    assert!(load.count("b") <= drained_at + 8);
    ctl_ok(&lb, &["maint", "app", &b_id]).await;
    assert_eq!(app_backends(&lb).await[&b_id]["state"], "maint");
    ctl_ok(&lb, &["activate", "app", &b_id]).await;
    assert_eq!(app_backends(&lb).await[&b_id]["state"], "active");

    // remove (drained) and remove --now: gone from the API, traffic continues without errors.
    let removing = ctl_ok(&lb, &["remove", "app", &c_id]).await;
    assert!(removing.contains("removing"), "{removing}");
    ctl_ok(&lb, &["remove", "app", &b_id, "--now"]).await;
    assert!(
        eventually(Duration::from_secs(5), || async {
            let backends = app_backends(&lb).await;
            !backends.contains_key(&c_id) && !backends.contains_key(&b_id)
        })
        .await,
        "{:?}",
        app_backends(&lb).await.keys()
    );
    let report = load.stop().await;
    assert!(report.failures.is_empty(), "{:?}", report.failures);
    let events = ctl_ok(&lb, &["events"]).await;
    for kind in [
        "backend_added",
        "backend_weight",
        "backend_state",
        "backend_removed",
    ] {
        assert!(events.contains(kind), "{kind} missing in\n{events}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ctl_needs_the_token_when_one_is_set() {
    let a = backend("a", 0);
    let config = config_for(&[(a.addr, 1)], "").replace(
        "[admin]\nlisten = \"127.0.0.1:0\"",
        "[admin]\nlisten = \"127.0.0.1:0\"\ntoken = \"t0ken\"",
    );
    let lb = balancer_with(&config, 1);
    let admin = lb.admin_url();

    for args in [
        vec!["--admin", admin.as_str(), "pools"],
        vec!["--admin", admin.as_str(), "--token", "nope", "pools"],
    ] {
        let out = ctl_env(&args, &[]).await;
        assert_eq!(out.code, Some(1), "{out:?}");
        assert!(out.stdout.is_empty(), "{out:?}");
        assert_eq!(out.stderr.lines().count(), 1, "{out:?}");
        assert!(
            out.stderr.contains("401") && out.stderr.contains("token"),
            "{out:?}"
        );
    }
    let out = ctl_env(&["--admin", &admin, "--token", "t0ken", "pools"], &[]).await;
    assert_eq!(out.code, Some(0), "{out:?}");
    assert!(out.stdout.contains("app"), "{out:?}");
    // Token and admin URL from the environment.
    let out = ctl_env(
        &["backends", "app"],
        &[("FULCRUM_ADMIN", &admin), ("FULCRUM_TOKEN", "t0ken")],
    )
    .await;
    assert_eq!(out.code, Some(0), "{out:?}");
    assert!(out.stdout.contains(&a.addr.to_string()), "{out:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ctl_reports_an_unreachable_admin_api() {
    let dead = format!("http://{}", dead_address());
    let out = ctl_env(&["--admin", &dead, "pools"], &[]).await;
    assert_eq!(out.code, Some(1), "{out:?}");
    assert!(out.stdout.is_empty(), "{out:?}");
    assert_eq!(out.stderr.lines().count(), 1, "{out:?}");
    assert!(
        out.stderr
            .contains(&format!("cannot reach admin API at {dead}")),
        "{out:?}"
    );
    let out = ctl_env(&["--admin", "ftp://127.0.0.1:1", "pools"], &[]).await;
    assert_eq!(out.code, Some(1), "{out:?}");
    assert!(out.stderr.contains("invalid admin URL"), "{out:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ctl_talks_to_a_tls_admin_with_a_private_ca_and_a_token_file() {
    let a = backend("a", 0);
    let dir = tempfile::tempdir().unwrap();
    let ca = Ca::new();
    let (cert, key) = ca.leaf(&["127.0.0.1"]).write(dir.path(), "admin");
    let ca_file = dir.path().join("ca.pem");
    std::fs::write(&ca_file, ca.pem()).unwrap();
    let token_file = dir.path().join("token");
    std::fs::write(&token_file, "t0ken\n").unwrap();
    let config = config_for(&[(a.addr, 1)], "").replace(
        "[admin]\nlisten = \"127.0.0.1:0\"",
        &format!(
            "[admin]\nlisten = \"127.0.0.1:0\"\ntoken_file = \"{}\"\ntls = {{ cert = \"{}\", key = \"{}\" }}",
            token_file.display(),
            cert.display(),
            key.display()
        ),
    );
    let lb = balancer_with(&config, 1);
    let admin = lb.listeners["admin"];
    let https = format!("https://{admin}");
    let (ca_arg, token_arg) = (ca_file.to_str().unwrap(), token_file.to_str().unwrap());

    // Trusted through --ca or FULCRUM_CA, with the token from --token-file or FULCRUM_TOKEN.
    let args = [
        "--admin",
        &https,
        "--ca",
        ca_arg,
        "--token-file",
        token_arg,
        "pools",
    ];
    let out = ctl_env(&args, &[]).await;
    assert_eq!(out.code, Some(0), "{out:?}");
    assert!(out.stdout.contains("app"), "{out:?}");
    let env = [("FULCRUM_CA", ca_arg), ("FULCRUM_TOKEN", "t0ken")];
    let out = ctl_env(&["--admin", &https, "backends", "app"], &env).await;
    assert_eq!(out.code, Some(0), "{out:?}");
    assert!(out.stdout.contains(&a.addr.to_string()), "{out:?}");

    // Without the token: 401 with a hint; an unknown CA: refused, with a hint.
    let out = ctl_env(&["--admin", &https, "--ca", ca_arg, "pools"], &[]).await;
    assert_eq!(out.code, Some(1), "{out:?}");
    assert!(
        out.stderr.contains("401") && out.stderr.contains("--token-file"),
        "{out:?}"
    );
    let out = ctl_env(&["--admin", &https, "--token", "t0ken", "pools"], &[]).await;
    assert_eq!(out.code, Some(1), "{out:?}");
    assert_eq!(out.stderr.lines().count(), 1, "{out:?}");
    assert!(
        out.stderr.contains("TLS") && out.stderr.contains("--ca"),
        "{out:?}"
    );
    let missing = dir.path().join("missing");
    let args = [
        "--admin",
        &https,
        "--token-file",
        missing.to_str().unwrap(),
        "pools",
    ];
    let out = ctl_env(&args, &[]).await;
    assert_eq!(out.code, Some(1), "{out:?}");
    assert!(out.stderr.contains("cannot read token file"), "{out:?}");

    // Plain HTTP to the TLS port fails cleanly: one error line, no answer, nothing served.
    let http = format!("http://{admin}");
    let out = ctl_env(&["--admin", &http, "--token", "t0ken", "pools"], &[]).await;
    assert_eq!(out.code, Some(1), "{out:?}");
    assert_eq!(out.stderr.lines().count(), 1, "{out:?}");
    assert!(out.stderr.contains("https://"), "{out:?}");
    let plain = client()
        .get(format!("{http}/api/pools"))
        .header("authorization", "Bearer t0ken")
        .send()
        .await;
    assert!(plain.is_err(), "{plain:?}");

    // And the admin still answers over TLS.
    let args = [
        "--admin", &https, "--ca", ca_arg, "--token", "t0ken", "pools",
    ];
    assert_eq!(ctl_env(&args, &[]).await.code, Some(0));
    // A client offering h2 (curl, browsers) gets HTTP/1.1, which is what the admin speaks.
    let browser = reqwest::Client::builder()
        .no_proxy()
        .timeout(Duration::from_secs(20))
        .tls_backend_preconfigured(trusting(&ca.pem()))
        .build()
        .unwrap();
    let answer = browser
        .get(format!("{https}/api/pools"))
        .header("authorization", "Bearer t0ken")
        .send()
        .await
        .unwrap();
    assert_eq!(answer.status(), 200);
    assert_eq!(answer.version(), reqwest::Version::HTTP_11);
}
