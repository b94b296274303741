//! `rewind`: one binary for nodes, the dev site and every client command.
//! Exit status: 0 done, 1 failed (one line on stderr says why), 2 bad usage;
//! a command may name others in its help (`rewind backup`: 3, 4).

mod cli;

use std::process::ExitCode;

use clap::Parser;

fn main() -> ExitCode {
    // Everything rewind creates (data folders, logs, journals, backing
    // files, images, overlays, keys) is its operator's alone: files 0600,
    // folders 0700.
    // SAFETY: umask only sets this process's file-creation mask.
    unsafe { libc::umask(0o077) };
    let cli = cli::Cli::parse();
    let filter = tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| {
        let default = if matches!(cli.command, cli::Command::Node { .. }) { "info" } else { "warn" };
        // GnuTLS clients (qemu, libnbd) send an IP address as the TLS
        // server name, which RFC 6066 forbids; rustls ignores it (the
        // certificate is still checked) and would warn at every connection.
        tracing_subscriber::EnvFilter::new(format!("{default},rustls::msgs::handshake=error"))
    });
    tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr).init();
    let runtime = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(r) => r,
        Err(e) => {
            eprintln!("rewind: error: start the async runtime: {e}");
            return ExitCode::from(1);
        }
    };
    match runtime.block_on(cli::run(cli.command)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("rewind: error: {e:#}");
            ExitCode::from(e.downcast_ref::<cli::ExitStatus>().map_or(1, |s| s.0))
        }
    }
}

