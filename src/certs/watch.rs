//! Reloads the certificate when its files change: polls both files' identity (device,
//! inode, size, mtime) each second, so a renamed-in file counts, and reloads once a
//! change has held still for one poll.

use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use super::CertStore;

const POLL: Duration = Duration::from_secs(1);

type Stamp = Option<(u64, u64, u64, i64, i64)>;

fn stamp(path: &Path) -> Stamp {
    // Follows symlinks: a swapped link target (Kubernetes secrets) counts as a change.
    let m = std::fs::metadata(path).ok()?;
    Some((m.dev(), m.ino(), m.size(), m.mtime(), m.mtime_nsec()))
}

/// Starts the polling thread for `store`'s files.
pub fn spawn_watcher(store: Arc<CertStore>) -> std::io::Result<()> {
    let stamps = |s: &CertStore| s.paths().map(|p| stamp(p));
    std::thread::Builder::new()
        .name("arcgate-certs".into())
        .spawn(move || {
            let mut loaded = stamps(&store);
            let mut seen = loaded;
            loop {
                std::thread::sleep(POLL);
                let now = stamps(&store);
                // Debounce: a writer may still be between the cert and the key.
                if now != loaded && now == seen {
                    store.reload("files changed");
                    // A refused pair is not retried until the files change again.
                    loaded = now;
                }
                seen = now;
            }
        })?;
    Ok(())
}
