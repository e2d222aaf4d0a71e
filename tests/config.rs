//! Configuration precedence at the real binary: flag > environment > file > default
//! (`core/src/config.rs`), for `listen` and `shards`, each set by every combination of
//! sources. Each row is read back three ways: the effective configuration `serve` prints at
//! start, the address it listens on, and the shard count the log was created with
//! (`stream/meta.json`).

mod common;

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::Stdio;
use std::time::{Duration, Instant};

use common::floodgate;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Source {
    File,
    Env,
    Flag,
}
use Source::{Env, File, Flag};

/// Each source sets its own value, so that what the server does tells which one won. The
/// addresses are distinct loopback addresses on ephemeral ports.
fn listen_from(source: Option<Source>) -> &'static str {
    match source {
        None => "127.0.0.1:8080",
        Some(File) => "127.0.0.2:0",
        Some(Env) => "127.0.0.3:0",
        Some(Flag) => "127.0.0.5:0",
    }
}

fn shards_from(source: Option<Source>) -> u32 {
    match source {
        None => 4,
        Some(File) => 2,
        Some(Env) => 3,
        Some(Flag) => 5,
    }
}

/// The source that must win among `set`.
fn winner(set: &[Source]) -> Option<Source> {
    [Flag, Env, File].into_iter().find(|s| set.contains(s))
}

/// What `serve` printed and did with one combination of sources.
struct Observed {
    effective: toml::Table,
    /// The address it listens on; `None` when it stopped before listening.
    listening: Option<String>,
    /// `shards` in `stream/meta.json`.
    log_shards: u32,
}

/// Runs `floodgate serve` with `listen` and `shards` set by the given sources. With the
/// default address (a fixed port, which a test must not take), the configuration file also
/// names a JWKS file that does not exist, so that the server stops after it printed its
/// configuration and created the log, just before it would listen.
fn serve(dir: &Path, listen: &[Source], shards: &[Source]) -> Observed {
    let stop_before_listening = winner(listen).is_none();
    let mut file = String::new();
    if listen.contains(&File) {
        file += &format!("[ingest]\nlisten = {:?}\n", listen_from(Some(File)));
    }
    if stop_before_listening {
        file += &format!(
            "[ingest.auth.jwt]\njwks_file = {:?}\nissuer = \"i\"\naudience = \"a\"\n",
            dir.join("missing-jwks.json").display().to_string()
        );
    }
    if shards.contains(&File) {
        file += &format!("[stream.embedded]\nshards = {}\n", shards_from(Some(File)));
    }
    let data = dir.join("data");
    let mut command = floodgate();
    command.arg("serve").arg("--data-dir").arg(&data);
    if !file.is_empty() {
        let path = dir.join("floodgate.toml");
        std::fs::write(&path, &file).unwrap();
        command.arg("--config").arg(path);
    }
    if listen.contains(&Env) {
        command.env("FLOODGATE_LISTEN", listen_from(Some(Env)));
    }
    if shards.contains(&Env) {
        command.env("FLOODGATE_SHARDS", shards_from(Some(Env)).to_string());
    }
    if listen.contains(&Flag) {
        command.args(["--listen", listen_from(Some(Flag))]);
    }
    if shards.contains(&Flag) {
        command.args(["--shards", &shards_from(Some(Flag)).to_string()]);
    }
    let stderr_path = dir.join("stderr");
    let mut child = command
        .env("FLOODGATE_LOG", "warn")
        .stdout(Stdio::piped())
        .stderr(std::fs::File::create(&stderr_path).unwrap())
        .spawn()
        .expect("floodgate starts");
    let stderr = || std::fs::read_to_string(&stderr_path).unwrap();

    let listening = if stop_before_listening {
        let deadline = Instant::now() + Duration::from_secs(60);
        let status = loop {
            if let Some(status) = child.try_wait().unwrap() {
                break status;
            }
            assert!(
                Instant::now() < deadline,
                "serve did not stop: {}",
                stderr()
            );
            std::thread::sleep(Duration::from_millis(20));
        };
        assert!(!status.success(), "{}", stderr());
        assert!(
            stderr().contains("cannot set up [ingest.auth]"),
            "stopped for another reason: {}",
            stderr()
        );
        None
    } else {
        // The first line on stdout, once it listens; none when it exits first.
        let line = BufReader::new(child.stdout.take().unwrap())
            .lines()
            .next()
            .and_then(Result::ok)
            .unwrap_or_else(|| panic!("serve did not listen: {}", stderr()));
        let addr = line
            .rsplit("http://")
            .next()
            .unwrap_or_else(|| panic!("unexpected first line {line:?}"))
            .trim()
            .to_owned();
        Some(addr)
    };
    let _ = child.kill();
    let _ = child.wait();

    // The effective configuration is printed before anything else, as TOML; an error or a
    // log line may follow it.
    let text = stderr();
    let (_, after) = text
        .split_once("effective configuration\n")
        .unwrap_or_else(|| panic!("no effective configuration printed: {text}"));
    let toml_text: String = after
        .lines()
        .take_while(|l| {
            l.is_empty()
                || l.starts_with('[')
                || l.split_once(" = ").is_some_and(|(k, _)| {
                    k.chars()
                        .all(|c| c.is_ascii_alphanumeric() || "_-\"".contains(c))
                })
        })
        .map(|l| format!("{l}\n"))
        .collect();
    let effective: toml::Table = toml_text
        .parse()
        .unwrap_or_else(|e| panic!("the effective configuration is not TOML ({e}): {text}"));

    let meta: serde_json::Value =
        serde_json::from_slice(&std::fs::read(data.join("stream/meta.json")).unwrap()).unwrap();
    Observed {
        effective,
        listening,
        log_shards: u32::try_from(meta["shards"].as_u64().unwrap()).unwrap(),
    }
}

#[test]
fn flags_beat_the_environment_which_beats_the_file_which_beats_the_default() {
    // (sources setting `listen`, sources setting `shards`): every combination appears for
    // each key, mixed so that the two keys are won by different sources in most rows.
    let rows: &[(&[Source], &[Source])] = &[
        (&[], &[]),
        (&[File], &[File]),
        (&[Env], &[Env]),
        (&[Flag], &[Flag]),
        (&[File, Env], &[File, Flag]),
        (&[File, Flag], &[Env, Flag]),
        (&[Env, Flag], &[File, Env]),
        (&[File, Env, Flag], &[File, Env, Flag]),
        (&[File], &[Env]),
        (&[Env], &[File]),
        (&[Flag], &[]),
        (&[], &[File, Env, Flag]),
        (&[File, Env, Flag], &[]),
    ];
    for &(listen, shards) in rows {
        let row = format!("listen set by {listen:?}, shards by {shards:?}");
        let dir = tempfile::tempdir().unwrap();
        let seen = serve(dir.path(), listen, shards);
        let want_listen = listen_from(winner(listen));
        let want_shards = shards_from(winner(shards));

        assert_eq!(
            seen.effective["ingest"]["listen"].as_str(),
            Some(want_listen),
            "{row}: printed listen"
        );
        assert_eq!(
            seen.effective["stream"]["embedded"]["shards"].as_integer(),
            Some(i64::from(want_shards)),
            "{row}: printed shards"
        );
        assert_eq!(seen.log_shards, want_shards, "{row}: shards in meta.json");
        match seen.listening {
            Some(addr) => {
                let want_ip = want_listen.rsplit_once(':').unwrap().0;
                assert_eq!(
                    addr.rsplit_once(':').map(|(ip, _)| ip),
                    Some(want_ip),
                    "{row}: listens on {addr}"
                );
            }
            None => assert_eq!(want_listen, listen_from(None), "{row}"),
        }
    }
}
