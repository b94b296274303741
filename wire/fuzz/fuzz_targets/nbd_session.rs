//! Any bytes a local NBD client sends, from the greeting on, to the real
//! server over an in-memory export of 1 MiB with 512-byte sectors: the
//! server ends the session with an error or cleanly, never a panic, and
//! the export sees only requests inside the disk and on sector bounds.
#![no_main]
use std::sync::{Arc, Mutex};

use libfuzzer_sys::fuzz_target;
use rewind_nbd::server::{serve, Answer, BoxFuture, Export};
use tokio::io::AsyncWriteExt;

const SIZE: u64 = 1 << 20;

struct Disk(Mutex<Vec<u8>>);

fn check(offset: u64, len: u64) {
    assert!(offset % 512 == 0 && len % 512 == 0 && offset + len <= SIZE, "the export got {offset}+{len}");
}

impl Export for Disk {
    fn name(&self) -> &str {
        "d0"
    }
    fn size(&self) -> u64 {
        SIZE
    }
    fn description(&self) -> &str {
        "fuzz"
    }
    fn read_only(&self) -> bool {
        false
    }
    fn block_min(&self) -> u32 {
        512
    }
    fn read(self: Arc<Self>, offset: u64, len: u32) -> BoxFuture<'static, Result<Vec<u8>, u32>> {
        check(offset, u64::from(len));
        let d = self.0.lock().unwrap()[offset as usize..(offset + u64::from(len)) as usize].to_vec();
        Box::pin(async move { Ok(d) })
    }
    fn write(self: Arc<Self>, offset: u64, data: Vec<u8>, _fua: bool) -> BoxFuture<'static, Answer> {
        check(offset, data.len() as u64);
        self.0.lock().unwrap()[offset as usize..offset as usize + data.len()].copy_from_slice(&data);
        Box::pin(async { Box::pin(async { 0u32 }) as Answer })
    }
    fn zero(self: Arc<Self>, offset: u64, len: u64, _trim: bool, _punch: bool, _fua: bool) -> BoxFuture<'static, Answer> {
        check(offset, len);
        self.0.lock().unwrap()[offset as usize..(offset + len) as usize].fill(0);
        Box::pin(async { Box::pin(async { 0u32 }) as Answer })
    }
    fn flush(self: Arc<Self>) -> Answer {
        Box::pin(async { 0u32 })
    }
}

fuzz_target!(|data: &[u8]| {
    let rt = tokio::runtime::Builder::new_current_thread().enable_time().build().unwrap();
    rt.block_on(async {
        let (client, server) = tokio::io::duplex(4 << 20);
        let export: Arc<dyn Export> = Arc::new(Disk(Mutex::new(vec![0; SIZE as usize])));
        let session = tokio::spawn(serve(export, server, "fuzz".into(), rewind_nbd::server::Tls::Off));
        // The client reads every reply and sends the fuzzer's bytes, then
        // ends its side: the server reads them all, then end of stream.
        let (mut replies, mut requests) = tokio::io::split(client);
        let drain = tokio::spawn(async move { tokio::io::copy(&mut replies, &mut tokio::io::sink()).await });
        let _ = requests.write_all(data).await;
        let _ = requests.shutdown().await;
        let ended = tokio::time::timeout(std::time::Duration::from_secs(20), session).await;
        assert!(ended.is_ok(), "the session did not end after the client's end of stream");
        drop(requests);
        let _ = drain.await;
    });
});
