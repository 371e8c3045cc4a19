//! Prints the etcd binary the harness would use (`$ETCD_BIN`, the vendored etcd 3.7.2, or
//! `etcd` on `PATH`), for shell scripts that start etcd themselves.

fn main() {
    match telemetry_harness::etcd_binary() {
        Ok(path) => println!("{}", path.display()),
        Err(err) => {
            eprintln!("error: {err}");
            std::process::exit(1);
        }
    }
}
