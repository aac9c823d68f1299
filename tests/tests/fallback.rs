//! Where io_uring cannot be set up (a seccomp filter refusing io_uring_setup, as in a
//! locked-down container), `auto` says so at start-up and serves on epoll; `io_uring`
//! refuses to start.

use std::net::{IpAddr, SocketAddr};

use sipmesh_tests::*;

fn wrapper() -> String {
    repo_root()
        .join("tests/data/without_io_uring.py")
        .to_string_lossy()
        .into_owned()
}

#[test]
fn auto_falls_back_to_epoll_and_says_why() {
    let addr = SocketAddr::new(IpAddr::V4(own_ip()), 5090);
    let w = wrapper();
    let sipd = Sipd::start_wrapped(&["python3", &w], addr, TEST_CONFIG, &[]);
    let err = sipd.stderr.lock().unwrap().clone();
    assert!(
        err.contains("io backend epoll (auto: io_uring setup failed"),
        "{err}"
    );
    assert!(err.contains("workers (epoll,epoll)"), "{err}");
    let c = UdpClient::new(sipd.addr);
    let me = c.local();
    let r = c.request(&register(
        me,
        "UDP",
        "fb",
        "f1",
        1,
        &[&format!("Contact: <sip:fb@{me}>")],
    ));
    assert_eq!(status(&r), 200, "{r}");
}

#[test]
fn io_uring_backend_refuses_to_start_without_it() {
    let w = wrapper();
    let seg = std::env::temp_dir().join(format!("sipmesh-fallback-{}.own", std::process::id()));
    let out = std::process::Command::new("python3")
        .arg(&w)
        .arg(sipd_bin())
        .args([
            "--listen",
            &format!("{}:5091", own_ip()),
            "--grpc",
            &format!("{}:45091", own_ip()),
            "--backend",
            "io_uring",
            "--no-store",
            "--segment",
        ])
        .arg(&seg)
        .output()
        .unwrap();
    let _ = std::fs::remove_file(&seg);
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("io_uring"), "{err}");
}
