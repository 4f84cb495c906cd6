//! The copy loop: `proxy::copy::pipe` (our bidirectional copy with lazy
//! 16 KiB buffers, byte counting, idle tracking and cancellation) moving
//! 16 MiB one way over in-memory duplex streams, against tokio's
//! `copy_bidirectional_with_sizes` with the same buffer size (what `pipe`
//! used before its buffers became lazy), to show what metering and lazy
//! buffers cost. No sockets and no TLS: this is the loop's own overhead,
//! an upper bound far above what loopback TCP plus TLS allow.
//!
//! Run: `cargo bench --bench copy`

use std::time::Duration;

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use spiffe_tunnel::proxy::copy::{pipe, CopyEnd, BUFFER_SIZE};
use tokio::io::{AsyncReadExt, AsyncWriteExt, DuplexStream};
use tokio::runtime::Runtime;
use tokio_util::sync::CancellationToken;

const TOTAL: usize = 16 * 1024 * 1024;
const CHUNK: usize = 16 * 1024;
/// In-memory pipe capacity, like a socket buffer.
const DUPLEX: usize = 256 * 1024;

#[derive(Clone, Copy)]
enum Loop {
    Pipe,
    TokioCopy,
}

/// client → [copy loop] → server: writes TOTAL bytes at the client end,
/// reads them at the server end, then closes the way back.
async fn move_bytes(kind: Loop) -> usize {
    let (mut client_outer, mut client_inner) = tokio::io::duplex(DUPLEX);
    let (mut server_inner, mut server_outer) = tokio::io::duplex(DUPLEX);
    let copier = tokio::spawn(async move {
        copy_loop(kind, &mut client_inner, &mut server_inner).await;
    });
    let writer = tokio::spawn(async move {
        let chunk = vec![0x5au8; CHUNK];
        let mut left = TOTAL;
        while left > 0 {
            let n = left.min(CHUNK);
            client_outer.write_all(&chunk[..n]).await.expect("write");
            left -= n;
        }
        client_outer.shutdown().await.expect("shutdown");
        // Wait for the way back to close, so the copy finishes cleanly.
        let mut rest = Vec::new();
        client_outer
            .read_to_end(&mut rest)
            .await
            .expect("read back");
    });
    let mut buf = vec![0u8; 64 * 1024];
    let mut got = 0;
    loop {
        let n = server_outer.read(&mut buf).await.expect("read");
        if n == 0 {
            break;
        }
        got += n;
    }
    server_outer.shutdown().await.expect("shutdown");
    writer.await.expect("writer");
    copier.await.expect("copier");
    assert_eq!(got, TOTAL);
    got
}

async fn copy_loop(kind: Loop, client: &mut DuplexStream, server: &mut DuplexStream) {
    match kind {
        Loop::Pipe => {
            let cancel = CancellationToken::new();
            let (moved, end) = pipe(client, server, Duration::from_secs(60), &cancel).await;
            assert!(matches!(end, CopyEnd::Done), "{end:?}");
            assert_eq!(moved.client_to_server, TOTAL as u64);
        }
        Loop::TokioCopy => {
            tokio::io::copy_bidirectional_with_sizes(client, server, BUFFER_SIZE, BUFFER_SIZE)
                .await
                .expect("copy");
        }
    }
}

fn bench_copy(c: &mut Criterion) {
    let runtimes: [(&str, Runtime); 2] = [
        (
            "multi_thread",
            tokio::runtime::Builder::new_multi_thread()
                .enable_all()
                .build()
                .expect("runtime"),
        ),
        (
            "current_thread",
            tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("runtime"),
        ),
    ];
    let mut group = c.benchmark_group("copy_16MiB");
    group.throughput(Throughput::Bytes(TOTAL as u64));
    group.sample_size(20);
    for (rt_name, rt) in &runtimes {
        for (name, kind) in [
            ("pipe", Loop::Pipe),
            ("tokio_copy_bidirectional", Loop::TokioCopy),
        ] {
            group.bench_function(format!("{name}/{rt_name}"), |b| {
                b.iter(|| rt.block_on(move_bytes(kind)))
            });
        }
    }
    group.finish();
}

criterion_group!(benches, bench_copy);
criterion_main!(benches);
