//! `portwatch top --watch` on a pseudo-terminal: the live screen, its keys, and the terminal
//! restored.

use portwatch_common::{Counters, Direction::Ingress as IN, IPPROTO_TCP, IPPROTO_UDP};
use portwatch_tests::{cli::Pw, fill_counters, kernel_test, key};

/// The text of terminal output: each control sequence becomes a space, and runs of spaces one.
fn plain(screen: &str) -> String {
    let mut out = String::new();
    let mut chars = screen.chars().peekable();
    while let Some(c) = chars.next() {
        if c == '\x1b' {
            if chars.peek() == Some(&'[') {
                chars.next();
                while chars.next().is_some_and(|c| !c.is_ascii_alphabetic()) {}
            }
            out.push(' ');
        } else {
            out.push(c);
        }
    }
    out.split_whitespace().collect::<Vec<_>>().join(" ")
}

/// Runs `portwatch top --watch` on a 100x24 pseudo-terminal (`script` from util-linux), waits until
/// the screen's text shows `until`, sends `key`, and returns everything written to the terminal.
/// Bounded: the child is killed after 20 s.
fn watch_on_a_terminal(pw: &Pw, key: &[u8], until: &str) -> (std::process::ExitStatus, String) {
    use std::{
        io::{Read, Write},
        process::{Command, Stdio},
        sync::{Arc, Mutex},
        time::{Duration, Instant},
    };
    let cmd = pw.command(&["top", "--watch", "--interval", "0.2"]);
    let line: Vec<String> = std::iter::once(cmd.get_program())
        .chain(cmd.get_args())
        .map(|a| format!("'{}'", a.to_str().unwrap()))
        .collect();
    let mut child = Command::new("script")
        .args([
            "-qec",
            &format!("stty rows 24 cols 100; exec {}", line.join(" ")),
            "/dev/null",
        ])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("running script(1)");
    let screen = Arc::new(Mutex::new(Vec::new()));
    let mut stdout = child.stdout.take().unwrap();
    let reader = {
        let screen = screen.clone();
        std::thread::spawn(move || {
            let mut buf = [0u8; 4096];
            while let Ok(n) = stdout.read(&mut buf) {
                if n == 0 {
                    break;
                }
                screen.lock().unwrap().extend_from_slice(&buf[..n]);
            }
        })
    };
    let started = Instant::now();
    let text = |s: &Arc<Mutex<Vec<u8>>>| String::from_utf8_lossy(&s.lock().unwrap()).into_owned();
    while !plain(&text(&screen)).contains(until) && started.elapsed() < portwatch_tests::bound(10.0) {
        std::thread::sleep(Duration::from_millis(50));
    }
    let mut stdin = child.stdin.take().unwrap();
    stdin.write_all(key).unwrap();
    stdin.flush().unwrap();
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if started.elapsed() > portwatch_tests::bound(20.0) {
            let _ = child.kill();
            break child.wait().unwrap();
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    drop(stdin);
    reader.join().unwrap();
    (status, text(&screen))
}

#[kernel_test]
fn top_watch_draws_a_live_screen_and_restores_the_terminal() {
    let lo = Pw::on_loopback("watch", &[]);
    let pw = &lo.pw;
    let entries = [
        (
            key("198.18.0.9", 443, IPPROTO_TCP, IN),
            Counters {
                bytes: 3 << 20,
                packets: 2100,
            },
        ),
        (
            key("2001:db8::9", 443, IPPROTO_UDP, IN),
            Counters {
                bytes: 5 << 10,
                packets: 7,
            },
        ),
    ];
    fill_counters(&pw.pin, 0, &entries).unwrap();
    const ENTER_ALTERNATE: &str = "\x1b[?1049h";
    const LEAVE_ALTERNATE: &str = "\x1b[?1049l";
    const SHOW_CURSOR: &str = "\x1b[?25h";
    // `q` quits; so does Ctrl-C, which arrives as a key in raw mode.
    for (key, name) in [(&b"q"[..], "q"), (&b"\x03"[..], "Ctrl-C")] {
        // The second reading adds rates (nothing flows: 0 B/s).
        let (status, screen) = watch_on_a_terminal(pw, key, "0 B/s");
        assert!(status.success(), "{name}: exit {status:?}; screen: {screen:?}");
        let text = plain(&screen);
        for shown in [
            "total: 3.0 MiB (3150848 bytes), 2107 packets; 2 rows",
            "IP BYTES PACKETS BYTES/S PKTS/S",
            "198.18.0.9 3.0 MiB 2100",
            "2001:db8::9 5.0 KiB 7",
            "0 B/s",
        ] {
            assert!(text.contains(shown), "{name}: the screen lacks {shown:?}: {text:?}");
        }
        let entered = screen.find(ENTER_ALTERNATE).expect("entered the alternate screen");
        let left = screen.rfind(LEAVE_ALTERNATE).expect("left the alternate screen");
        assert!(left > entered, "{name}: the terminal was not restored");
        assert!(
            screen[left..].contains(SHOW_CURSOR),
            "{name}: the cursor was not shown again"
        );
    }
}
