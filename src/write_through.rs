//! `AsyncWrite` for the stream wrappers that only change how bytes are
//! *read* (the copy loop's byte counter, the read-ahead under rustls, the
//! dev agent's HTTP/2 authority rewriter): every write call, vectored ones
//! included, goes unchanged to one field. One definition instead of a
//! hand-copied impl per wrapper, so none of them can forget to forward
//! `poll_write_vectored` (which would silently turn rustls's vectored
//! writes into one system call per record).

/// `write_through!(field for [generics] Type)` implements
/// `tokio::io::AsyncWrite` for `Type` by forwarding to `self.field`, which
/// must be `AsyncWrite + Unpin` (a `&mut` to such a stream is one too).
macro_rules! write_through {
    ($field:ident for [$($generics:tt)*] $ty:ty) => {
        impl<$($generics)*> tokio::io::AsyncWrite for $ty {
            fn poll_write(
                self: std::pin::Pin<&mut Self>,
                cx: &mut std::task::Context<'_>,
                buf: &[u8],
            ) -> std::task::Poll<std::io::Result<usize>> {
                tokio::io::AsyncWrite::poll_write(std::pin::Pin::new(&mut self.get_mut().$field), cx, buf)
            }

            fn poll_write_vectored(
                self: std::pin::Pin<&mut Self>,
                cx: &mut std::task::Context<'_>,
                bufs: &[std::io::IoSlice<'_>],
            ) -> std::task::Poll<std::io::Result<usize>> {
                tokio::io::AsyncWrite::poll_write_vectored(
                    std::pin::Pin::new(&mut self.get_mut().$field),
                    cx,
                    bufs,
                )
            }

            fn is_write_vectored(&self) -> bool {
                tokio::io::AsyncWrite::is_write_vectored(&self.$field)
            }

            fn poll_flush(
                self: std::pin::Pin<&mut Self>,
                cx: &mut std::task::Context<'_>,
            ) -> std::task::Poll<std::io::Result<()>> {
                tokio::io::AsyncWrite::poll_flush(std::pin::Pin::new(&mut self.get_mut().$field), cx)
            }

            fn poll_shutdown(
                self: std::pin::Pin<&mut Self>,
                cx: &mut std::task::Context<'_>,
            ) -> std::task::Poll<std::io::Result<()>> {
                tokio::io::AsyncWrite::poll_shutdown(std::pin::Pin::new(&mut self.get_mut().$field), cx)
            }
        }
    };
}

pub(crate) use write_through;
