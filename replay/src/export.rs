//! A replayed disk as an NBD export (`rewind replay --serve`): reads come
//! from a [`BlockSource`] as of one LSN; writes, when the export is
//! writable, land in a local copy-on-write [`Overlay`] and never reach the
//! log.

use std::sync::Arc;

use rewind_nbd::protocol::{EIO, EPERM};
use rewind_nbd::server::{Answer, BoxFuture, Export};

use crate::{read_bytes, BlockSource, Overlay};

/// The NBD export of a disk as of one point.
pub struct ReplayExport<S> {
    name: String,
    description: String,
    source: S,
    overlay: Option<Overlay>,
}

impl<S: BlockSource + 'static> ReplayExport<S> {
    /// A read-only export when `overlay` is None, else a writable one whose
    /// writes go to the overlay. `description` is the line NBD clients see.
    pub fn new(name: &str, description: String, source: S, overlay: Option<Overlay>) -> ReplayExport<S> {
        ReplayExport { name: name.to_string(), description, source, overlay }
    }

    pub fn source(&self) -> &S {
        &self.source
    }

    pub fn overlay(&self) -> Option<&Overlay> {
        self.overlay.as_ref()
    }

    /// Writes to the overlay, synced when the client asked for FUA.
    async fn write_overlay(&self, offset: u64, len: u64, data: Option<&[u8]>, fua: bool) -> u32 {
        let Some(o) = &self.overlay else { return EPERM };
        match o.write(&self.source, offset, len, data).await {
            Ok(()) if fua => sync_answer(o),
            Ok(()) => 0,
            Err(e) => eio("overlay write failed", e),
        }
    }
}

fn eio(what: &str, e: impl std::fmt::Display) -> u32 {
    tracing::error!("{what}: {e}");
    EIO
}

fn sync_answer(o: &Overlay) -> u32 {
    o.sync().map_or_else(|e| eio("overlay sync failed", e), |_| 0)
}

// `write` and `zero` return a future of a future on purpose: the outer one
// is the ordering step, the inner one the reply (see `Export`).
#[allow(clippy::async_yields_async)]
impl<S: BlockSource + 'static> Export for ReplayExport<S> {
    fn name(&self) -> &str {
        &self.name
    }

    fn size(&self) -> u64 {
        self.source.size()
    }

    fn description(&self) -> &str {
        &self.description
    }

    fn read_only(&self) -> bool {
        self.overlay.is_none()
    }

    fn read(self: Arc<Self>, offset: u64, len: u32) -> BoxFuture<'static, Result<Vec<u8>, u32>> {
        Box::pin(async move {
            let r = match &self.overlay {
                Some(o) => o.read(&self.source, offset, u64::from(len)).await,
                None => read_bytes(&self.source, offset, u64::from(len)).await,
            };
            r.map_err(|e| eio("read of the replayed disk failed", e))
        })
    }

    fn write(self: Arc<Self>, offset: u64, data: Vec<u8>, fua: bool) -> BoxFuture<'static, Answer> {
        Box::pin(async move {
            let code = self.write_overlay(offset, data.len() as u64, Some(&data), fua).await;
            let answer: Answer = Box::pin(async move { code });
            answer
        })
    }

    fn zero(self: Arc<Self>, offset: u64, len: u64, _trim: bool, _punch: bool, fua: bool) -> BoxFuture<'static, Answer> {
        Box::pin(async move {
            let code = self.write_overlay(offset, len, None, fua).await;
            let answer: Answer = Box::pin(async move { code });
            answer
        })
    }

    fn flush(self: Arc<Self>) -> Answer {
        Box::pin(async move { self.overlay.as_ref().map_or(0, sync_answer) })
    }
}
