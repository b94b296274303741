//! `rewind backup`'s wiring: the importer (`rewind_cdp_ingest::backup`)
//! over an NBD source (`rewind_nbd::client`) and the site's client.

use rewind_cdp_ingest::backup::Source;
use rewind_cdp_ingest::BoxFuture;
use rewind_nbd::client::{Client as NbdClient, ClientError, NbdUri, STATE_DIRTY, STATE_ZERO};
use rewind_wire::rpc::{BackupInfo, DiskSpec, Request, Response};

use crate::client::Client;

const ALLOCATION: &str = "base:allocation";

/// The context name under which qemu-nbd exports a dirty bitmap.
pub fn bitmap_context(name: &str) -> String {
    format!("qemu:dirty-bitmap:{name}")
}

/// An NBD export read as a backup's source.
pub struct NbdSource {
    nbd: NbdClient,
}

impl NbdSource {
    /// Connects to `uri`, asking for `base:allocation` and, if given, the
    /// dirty bitmap's context.
    pub async fn connect(uri: &NbdUri, bitmap: Option<&str>, tls: Option<&tokio_rustls::TlsConnector>) -> Result<NbdSource, ClientError> {
        let mut meta = vec![ALLOCATION.to_string()];
        meta.extend(bitmap.map(bitmap_context));
        let refs: Vec<&str> = meta.iter().map(String::as_str).collect();
        Ok(NbdSource { nbd: NbdClient::connect(uri, &refs, tls).await? })
    }

    pub async fn disconnect(self) {
        let _ = self.nbd.disconnect().await;
    }
}

impl Source for NbdSource {
    fn size(&self) -> u64 {
        self.nbd.size
    }

    fn knows_zeroes(&self) -> bool {
        self.nbd.context(ALLOCATION).is_some()
    }

    fn has_bitmap(&self, name: &str) -> bool {
        self.nbd.context(&bitmap_context(name)).is_some()
    }

    fn extents<'a>(&'a mut self, bitmap: Option<&'a str>, offset: u64, len: u64) -> BoxFuture<'a, Result<Vec<(u64, u64, bool)>, String>> {
        Box::pin(async move {
            let (name, flag) = match bitmap {
                Some(b) => (bitmap_context(b), STATE_DIRTY),
                None => (ALLOCATION.to_string(), STATE_ZERO),
            };
            let id = self.nbd.context(&name).ok_or_else(|| format!("the source did not agree to meta context {name}"))?;
            let len = u32::try_from(len).unwrap_or(u32::MAX - 4095);
            let placed = self.nbd.block_status(id, offset, len).await.map_err(|e| format!("block status of {name} at byte {offset}: {e}"))?;
            Ok(placed.into_iter().map(|p| (p.offset, p.len, p.flags & flag != 0)).collect())
        })
    }

    fn read(&mut self, offset: u64, len: u64) -> BoxFuture<'_, Result<Vec<u8>, String>> {
        Box::pin(async move {
            let len = u32::try_from(len).map_err(|_| format!("a read of {len} bytes"))?;
            self.nbd.read(offset, len).await.map_err(|e| format!("read of {len} bytes at byte {offset} of the source: {e}"))
        })
    }
}

/// The site as the importer asks it.
pub struct SiteClient(pub Client);

impl rewind_cdp_ingest::backup::Site for SiteClient {
    fn disks<'a>(&'a self, group: &'a str) -> BoxFuture<'a, Result<Vec<DiskSpec>, String>> {
        Box::pin(async move {
            match self.0.call_leader(&Request::GroupState { group: group.to_string() }).await.map_err(|e| e.to_string())? {
                Response::Group(g) => Ok(g.disks),
                other => Err(format!("unexpected reply {other:?}")),
            }
        })
    }

    fn backups<'a>(&'a self, group: &'a str) -> BoxFuture<'a, Result<Vec<BackupInfo>, String>> {
        Box::pin(async move {
            match self.0.call_leader(&Request::Backups { group: group.to_string(), on_leader: true }).await.map_err(|e| e.to_string())? {
                Response::Backups(b) => Ok(b),
                other => Err(format!("unexpected reply {other:?}")),
            }
        })
    }

    fn block_hashes<'a>(&'a self, group: &'a str, disk: &'a str, lsn: u64, first: u64, count: u32) -> BoxFuture<'a, Result<Vec<[u8; 32]>, String>> {
        Box::pin(async move {
            let request = Request::BlockHashes { group: group.to_string(), disk: disk.to_string(), lsn, block_first: first, count };
            match self.0.call_leader(&request).await.map_err(|e| e.to_string())? {
                Response::BlockHashes { hashes, .. } if hashes.len() == count as usize * 32 => {
                    Ok(hashes.chunks_exact(32).map(|h| h.try_into().expect("32 bytes")).collect())
                }
                Response::BlockHashes { hashes, .. } => Err(format!("the site answered {count} block hashes with {} bytes", hashes.len())),
                other => Err(format!("unexpected reply {other:?}")),
            }
        })
    }

    fn find_blocks<'a>(&'a self, group: &'a str, hashes: &'a [[u8; 32]], lsn: u64) -> BoxFuture<'a, Result<Vec<Option<(String, u64, u64)>>, String>> {
        Box::pin(async move {
            let request = Request::FindBlocks { group: group.to_string(), hashes: hashes.concat(), lsn };
            match self.0.call_leader(&request).await.map_err(|e| e.to_string())? {
                Response::Found(f) if f.len() == hashes.len() => Ok(f),
                other => Err(format!("unexpected reply {other:?}")),
            }
        })
    }
}
