//! Lets gRPC clients that name the socket path in `:authority` reach the
//! dev agent.
//!
//! Why this exists: gRPC C-core (Python's `grpcio`, hence py-spiffe; C++,
//! Ruby, PHP) sends the percent-encoded socket path as the HTTP/2
//! `:authority` of a `unix:` channel (since gRPC 1.57), and grpc-java sends
//! the raw path. Neither is a valid authority, and the `h2` crate under
//! tonic answers such a request with RST_STREAM(PROTOCOL_ERROR), with no
//! option to relax it (hyperium/h2#487, grpc/grpc#38142). SPIRE's agent is
//! a grpc-go server, which ignores the authority, so these clients work
//! against SPIRE; a dev agent standing in for SPIRE must let them in too.
//!
//! How: each accepted connection is wrapped in [`FixedAuthority`], which
//! rewrites what the server reads. The connection preface and every frame
//! other than HEADERS/CONTINUATION pass through untouched. Each header
//! block is decoded with a full HPACK decoder (static and dynamic tables,
//! Huffman), its `:authority` set to `localhost` (what grpc-go sends over
//! Unix sockets), and re-encoded with literals only, so that the server's
//! decoder needs no dynamic table state. Padding is dropped; the priority
//! fields and the END_STREAM flag are kept. Input that does not start
//! with the HTTP/2 preface is passed through as it is. Malformed HPACK or
//! framing ends the connection, as h2 itself would.
//!
//! Only the client-to-server direction is touched; writes go straight to
//! the socket. Header blocks are small (a Workload API request has a
//! handful of short headers), so they are bounded tightly.

use std::collections::VecDeque;
use std::io;
use std::pin::Pin;
use std::sync::LazyLock;
use std::task::{ready, Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::UnixStream;
use tonic::transport::server::{Connected, UdsConnectInfo};

const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
const FRAME_HEADER_LEN: usize = 9;
const TYPE_HEADERS: u8 = 0x1;
const TYPE_CONTINUATION: u8 = 0x9;
const FLAG_END_STREAM: u8 = 0x1;
const FLAG_END_HEADERS: u8 = 0x4;
const FLAG_PADDED: u8 = 0x8;
const FLAG_PRIORITY: u8 = 0x20;

/// Every HTTP/2 endpoint accepts frames this large (the floor of
/// SETTINGS_MAX_FRAME_SIZE), so re-encoded blocks are cut to it.
const MAX_FRAME_PAYLOAD: usize = 16_384;
/// Largest header block accepted, compressed or decoded.
const MAX_HEADER_BLOCK: usize = 64 * 1024;
/// The HPACK dynamic table size a client starts with: the server's
/// SETTINGS_HEADER_TABLE_SIZE, which tonic leaves at the default.
const INITIAL_TABLE_SIZE: usize = 4096;
/// Largest dynamic table size update accepted.
const MAX_TABLE_SIZE: usize = 64 * 1024;
/// Per RFC 7541 §4.1, the overhead counted for each table entry.
const ENTRY_OVERHEAD: usize = 32;

const AUTHORITY: &[u8] = b":authority";
const REPLACEMENT_AUTHORITY: &[u8] = b"localhost";

fn malformed(what: &'static str) -> io::Error {
    io::Error::new(
        io::ErrorKind::InvalidData,
        format!("malformed HTTP/2 from a Workload API client: {what}"),
    )
}

/// A client connection whose header blocks are rewritten as described in
/// the module documentation.
pub(crate) struct FixedAuthority {
    inner: UnixStream,
    rewriter: Rewriter,
    /// Rewritten bytes not yet handed to the server, from `out_pos` on.
    out: Vec<u8>,
    out_pos: usize,
}

impl FixedAuthority {
    pub(crate) fn new(inner: UnixStream) -> Self {
        Self {
            inner,
            rewriter: Rewriter::new(),
            out: Vec::new(),
            out_pos: 0,
        }
    }
}

impl Connected for FixedAuthority {
    type ConnectInfo = UdsConnectInfo;

    /// The caller's uid comes from the socket, as without the wrapper.
    fn connect_info(&self) -> Self::ConnectInfo {
        self.inner.connect_info()
    }
}

impl AsyncRead for FixedAuthority {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        loop {
            if this.out_pos < this.out.len() {
                let available = &this.out[this.out_pos..];
                let n = available.len().min(buf.remaining());
                buf.put_slice(&available[..n]);
                this.out_pos += n;
                if this.out_pos == this.out.len() {
                    this.out.clear();
                    this.out_pos = 0;
                }
                return Poll::Ready(Ok(()));
            }
            let mut chunk = [0u8; 8192];
            let mut chunk_buf = ReadBuf::new(&mut chunk);
            ready!(Pin::new(&mut this.inner).poll_read(cx, &mut chunk_buf))?;
            let read = chunk_buf.filled();
            if read.is_empty() {
                return Poll::Ready(Ok(())); // end of stream
            }
            this.rewriter.feed(read, &mut this.out)?;
        }
    }
}

impl AsyncWrite for FixedAuthority {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }
}

enum Phase {
    /// Matching the connection preface; this many bytes matched so far.
    Preface(usize),
    Frames,
    /// Not HTTP/2 with prior knowledge: none of our business.
    Raw,
}

/// A header block being collected from HEADERS and CONTINUATION frames.
struct PendingBlock {
    stream_id: u32,
    end_stream: bool,
    priority: Option<[u8; 5]>,
    fragment: Vec<u8>,
}

/// The byte-stream rewriter, independent of any IO so it can be tested.
struct Rewriter {
    phase: Phase,
    /// Input not consumed yet: part of a frame header or of a header frame.
    pending: Vec<u8>,
    /// Payload bytes of a passed-through frame still to forward.
    passthrough: usize,
    block: Option<PendingBlock>,
    decoder: Decoder,
}

impl Rewriter {
    fn new() -> Self {
        Self {
            phase: Phase::Preface(0),
            pending: Vec::new(),
            passthrough: 0,
            block: None,
            decoder: Decoder::new(),
        }
    }

    /// Consumes `input`, appending what the server should read to `out`.
    fn feed(&mut self, mut input: &[u8], out: &mut Vec<u8>) -> io::Result<()> {
        loop {
            match self.phase {
                Phase::Raw => {
                    out.extend_from_slice(input);
                    return Ok(());
                }
                Phase::Preface(matched) => {
                    let expected = PREFACE.get(matched..).unwrap_or_default();
                    let n = expected.len().min(input.len());
                    if input.get(..n) != expected.get(..n) {
                        self.phase = Phase::Raw;
                        continue;
                    }
                    out.extend_from_slice(&input[..n]);
                    input = &input[n..];
                    self.phase = if matched + n == PREFACE.len() {
                        Phase::Frames
                    } else {
                        Phase::Preface(matched + n)
                    };
                    if input.is_empty() {
                        return Ok(());
                    }
                }
                Phase::Frames => {
                    self.pending.extend_from_slice(input);
                    return self.frames(out);
                }
            }
        }
    }

    fn frames(&mut self, out: &mut Vec<u8>) -> io::Result<()> {
        let pending = std::mem::take(&mut self.pending);
        let mut pos = 0;
        let result = loop {
            let rest = &pending[pos..];
            if self.passthrough > 0 {
                let n = self.passthrough.min(rest.len());
                out.extend_from_slice(&rest[..n]);
                pos += n;
                self.passthrough -= n;
                if self.passthrough > 0 {
                    break Ok(());
                }
                continue;
            }
            let Some(header) = rest.get(..FRAME_HEADER_LEN) else {
                break Ok(());
            };
            let len =
                usize::from(header[0]) << 16 | usize::from(header[1]) << 8 | usize::from(header[2]);
            let kind = header[3];
            let flags = header[4];
            let stream_id =
                u32::from_be_bytes([header[5], header[6], header[7], header[8]]) & 0x7fff_ffff;
            if self.block.is_some() && kind != TYPE_CONTINUATION {
                break Err(malformed("a header block was interrupted by another frame"));
            }
            if kind != TYPE_HEADERS && kind != TYPE_CONTINUATION {
                out.extend_from_slice(header);
                pos += FRAME_HEADER_LEN;
                self.passthrough = len;
                continue;
            }
            if len > MAX_HEADER_BLOCK {
                break Err(malformed("header frame too large"));
            }
            let Some(payload) = rest.get(FRAME_HEADER_LEN..FRAME_HEADER_LEN + len) else {
                break Ok(()); // wait for the rest of the frame
            };
            pos += FRAME_HEADER_LEN + len;
            if let Err(e) = self.header_frame(kind, flags, stream_id, payload, out) {
                break Err(e);
            }
        };
        self.pending = pending.get(pos..).unwrap_or_default().to_vec();
        result
    }

    fn header_frame(
        &mut self,
        kind: u8,
        flags: u8,
        stream_id: u32,
        payload: &[u8],
        out: &mut Vec<u8>,
    ) -> io::Result<()> {
        if kind == TYPE_HEADERS {
            let mut body = payload;
            let mut padding = 0;
            if flags & FLAG_PADDED != 0 {
                let (&pad, rest) = body
                    .split_first()
                    .ok_or(malformed("padded frame too short"))?;
                padding = usize::from(pad);
                body = rest;
            }
            let mut priority = None;
            if flags & FLAG_PRIORITY != 0 {
                let fields = body.get(..5).ok_or(malformed("priority fields missing"))?;
                priority = Some([fields[0], fields[1], fields[2], fields[3], fields[4]]);
                body = &body[5..];
            }
            let end = body
                .len()
                .checked_sub(padding)
                .ok_or(malformed("padding longer than the frame"))?;
            self.block = Some(PendingBlock {
                stream_id,
                end_stream: flags & FLAG_END_STREAM != 0,
                priority,
                fragment: body[..end].to_vec(),
            });
        } else {
            let block = self
                .block
                .as_mut()
                .ok_or(malformed("CONTINUATION without HEADERS"))?;
            if block.stream_id != stream_id {
                return Err(malformed("CONTINUATION on another stream"));
            }
            if block.fragment.len() + payload.len() > MAX_HEADER_BLOCK {
                return Err(malformed("header block too large"));
            }
            block.fragment.extend_from_slice(payload);
        }
        if flags & FLAG_END_HEADERS == 0 {
            return Ok(());
        }
        let Some(block) = self.block.take() else {
            return Ok(());
        };
        let mut fields = self.decoder.decode(&block.fragment)?;
        for field in &mut fields {
            if field.name == AUTHORITY {
                field.value = REPLACEMENT_AUTHORITY.to_vec();
            }
        }
        write_header_frames(&block, &encode(&fields), out);
        Ok(())
    }
}

fn write_frame_header(out: &mut Vec<u8>, len: usize, kind: u8, flags: u8, stream_id: u32) {
    // len <= MAX_FRAME_PAYLOAD, which fits in the 24-bit length field.
    out.extend_from_slice(&[(len >> 16) as u8, (len >> 8) as u8, len as u8, kind, flags]);
    out.extend_from_slice(&stream_id.to_be_bytes());
}

/// Emits a header block as HEADERS plus as many CONTINUATION frames as
/// the frame size floor requires.
fn write_header_frames(block: &PendingBlock, encoded: &[u8], out: &mut Vec<u8>) {
    let priority_len = if block.priority.is_some() { 5 } else { 0 };
    let first_len = encoded.len().min(MAX_FRAME_PAYLOAD - priority_len);
    let (first, mut rest) = encoded.split_at(first_len);
    let mut flags = 0;
    if block.end_stream {
        flags |= FLAG_END_STREAM;
    }
    if block.priority.is_some() {
        flags |= FLAG_PRIORITY;
    }
    if rest.is_empty() {
        flags |= FLAG_END_HEADERS;
    }
    write_frame_header(
        out,
        priority_len + first.len(),
        TYPE_HEADERS,
        flags,
        block.stream_id,
    );
    if let Some(priority) = &block.priority {
        out.extend_from_slice(priority);
    }
    out.extend_from_slice(first);
    while !rest.is_empty() {
        let (chunk, remaining) = rest.split_at(rest.len().min(MAX_FRAME_PAYLOAD));
        let flags = if remaining.is_empty() {
            FLAG_END_HEADERS
        } else {
            0
        };
        write_frame_header(out, chunk.len(), TYPE_CONTINUATION, flags, block.stream_id);
        out.extend_from_slice(chunk);
        rest = remaining;
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
struct Field {
    name: Vec<u8>,
    value: Vec<u8>,
    /// Sent as "never indexed" (RFC 7541 §6.2.3); kept so when re-encoded.
    never_indexed: bool,
}

/// An HPACK decoder (RFC 7541) mirroring the client's dynamic table.
struct Decoder {
    /// Newest entry first, as HPACK indexes it.
    table: VecDeque<(Vec<u8>, Vec<u8>)>,
    size: usize,
    max_size: usize,
}

impl Decoder {
    fn new() -> Self {
        Self {
            table: VecDeque::new(),
            size: 0,
            max_size: INITIAL_TABLE_SIZE,
        }
    }

    fn decode(&mut self, mut block: &[u8]) -> io::Result<Vec<Field>> {
        let mut fields = Vec::new();
        let mut list_size = 0usize;
        while let Some(&first) = block.first() {
            let field = if first & 0x80 != 0 {
                let index = decode_int(&mut block, 7)?;
                let (name, value) = self.get(index)?;
                Field {
                    name,
                    value,
                    never_indexed: false,
                }
            } else if first & 0xc0 == 0x40 {
                let (name, value) = self.literal(&mut block, 6)?;
                self.insert(name.clone(), value.clone());
                Field {
                    name,
                    value,
                    never_indexed: false,
                }
            } else if first & 0xe0 == 0x20 {
                // A dynamic table size update: only before the first field.
                if !fields.is_empty() {
                    return Err(malformed("table size update after a header field"));
                }
                let size = decode_int(&mut block, 5)?;
                if size > MAX_TABLE_SIZE {
                    return Err(malformed("dynamic table size too large"));
                }
                self.max_size = size;
                self.evict(0);
                continue;
            } else {
                let (name, value) = self.literal(&mut block, 4)?;
                Field {
                    name,
                    value,
                    never_indexed: first & 0x10 != 0,
                }
            };
            list_size += field.name.len() + field.value.len() + ENTRY_OVERHEAD;
            if list_size > MAX_HEADER_BLOCK {
                return Err(malformed("header list too large"));
            }
            fields.push(field);
        }
        Ok(fields)
    }

    fn literal(&self, block: &mut &[u8], prefix: u8) -> io::Result<(Vec<u8>, Vec<u8>)> {
        let index = decode_int(block, prefix)?;
        let name = if index == 0 {
            decode_string(block)?
        } else {
            self.get(index)?.0
        };
        let value = decode_string(block)?;
        Ok((name, value))
    }

    fn get(&self, index: usize) -> io::Result<(Vec<u8>, Vec<u8>)> {
        if index == 0 {
            return Err(malformed("header index 0"));
        }
        if let Some((name, value)) = STATIC_TABLE.get(index - 1) {
            return Ok((name.to_vec(), value.to_vec()));
        }
        self.table
            .get(index - 1 - STATIC_TABLE.len())
            .cloned()
            .ok_or(malformed("header index beyond the tables"))
    }

    /// Makes room for `incoming` bytes, oldest entries first.
    fn evict(&mut self, incoming: usize) {
        while self.size + incoming > self.max_size {
            let Some((name, value)) = self.table.pop_back() else {
                break;
            };
            self.size -= name.len() + value.len() + ENTRY_OVERHEAD;
        }
    }

    fn insert(&mut self, name: Vec<u8>, value: Vec<u8>) {
        let size = name.len() + value.len() + ENTRY_OVERHEAD;
        if size > self.max_size {
            // RFC 7541 §4.4: an entry larger than the table empties it.
            self.table.clear();
            self.size = 0;
            return;
        }
        self.evict(size);
        self.size += size;
        self.table.push_front((name, value));
    }
}

/// An HPACK integer with an N-bit prefix (RFC 7541 §5.1).
fn decode_int(block: &mut &[u8], prefix: u8) -> io::Result<usize> {
    let (&first, rest) = block.split_first().ok_or(malformed("truncated integer"))?;
    *block = rest;
    let mask = (1u8 << prefix) - 1;
    let mut value = usize::from(first & mask);
    if value < usize::from(mask) {
        return Ok(value);
    }
    let mut shift = 0u32;
    loop {
        let (&byte, rest) = block.split_first().ok_or(malformed("truncated integer"))?;
        *block = rest;
        // Anything past 2^28 is far beyond every limit here.
        if shift > 21 {
            return Err(malformed("integer too large"));
        }
        value += usize::from(byte & 0x7f) << shift;
        shift += 7;
        if byte & 0x80 == 0 {
            return Ok(value);
        }
    }
}

/// An HPACK string literal (RFC 7541 §5.2), Huffman-coded or not.
fn decode_string(block: &mut &[u8]) -> io::Result<Vec<u8>> {
    let huffman = block.first().is_some_and(|&b| b & 0x80 != 0);
    let len = decode_int(block, 7)?;
    if len > block.len() {
        return Err(malformed("truncated string"));
    }
    let (raw, rest) = block.split_at(len);
    *block = rest;
    if huffman {
        huffman_decode(raw)
    } else {
        Ok(raw.to_vec())
    }
}

fn encode_int(out: &mut Vec<u8>, value: usize, prefix: u8, flags: u8) {
    let mask = (1u8 << prefix) - 1;
    if value < usize::from(mask) {
        out.push(flags | value as u8);
        return;
    }
    out.push(flags | mask);
    let mut rest = value - usize::from(mask);
    while rest >= 0x80 {
        out.push((rest & 0x7f) as u8 | 0x80);
        rest >>= 7;
    }
    out.push(rest as u8);
}

/// Encodes fields as literals with literal names and raw strings: no
/// dynamic table, no Huffman, so the server's decoder state stays empty.
fn encode(fields: &[Field]) -> Vec<u8> {
    let mut out = Vec::new();
    for field in fields {
        // "Literal without indexing" (0000) or "never indexed" (0001),
        // with index 0: a literal name follows.
        out.push(if field.never_indexed { 0x10 } else { 0x00 });
        for s in [&field.name, &field.value] {
            encode_int(&mut out, s.len(), 7, 0x00);
            out.extend_from_slice(s);
        }
    }
    out
}

/// Huffman code lengths of symbols 0-255 and EOS (256), RFC 7541
/// Appendix B. The code is canonical, so the codes follow from the lengths
/// (checked against the RFC's codes in the tests).
const HUFFMAN_CODE_LENGTHS: [u8; 257] = [
    13, 23, 28, 28, 28, 28, 28, 28, 28, 24, 30, 28, 28, 30, 28, 28, 28, 28, 28, 28, 28, 28, 30, 28,
    28, 28, 28, 28, 28, 28, 28, 28, 6, 10, 10, 12, 13, 6, 8, 11, 10, 10, 8, 11, 8, 6, 6, 6, 5, 5,
    5, 6, 6, 6, 6, 6, 6, 6, 7, 8, 15, 6, 12, 10, 13, 6, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7,
    7, 7, 7, 7, 7, 7, 7, 7, 8, 7, 8, 13, 19, 13, 14, 6, 15, 5, 6, 5, 6, 5, 6, 6, 6, 5, 7, 7, 6, 6,
    6, 5, 6, 7, 6, 5, 5, 6, 7, 7, 7, 7, 7, 15, 11, 14, 13, 28, 20, 22, 20, 20, 22, 22, 22, 23, 22,
    23, 23, 23, 23, 23, 24, 23, 24, 24, 22, 23, 24, 23, 23, 23, 23, 21, 22, 23, 22, 23, 23, 24, 22,
    21, 20, 22, 22, 23, 23, 21, 23, 22, 22, 24, 21, 22, 23, 23, 21, 21, 22, 21, 23, 22, 23, 23, 20,
    22, 22, 22, 23, 22, 22, 23, 26, 26, 20, 19, 22, 23, 22, 25, 26, 26, 26, 27, 27, 26, 24, 25, 19,
    21, 26, 27, 27, 26, 27, 24, 21, 21, 26, 26, 28, 27, 27, 27, 20, 24, 20, 21, 22, 21, 21, 23, 22,
    22, 25, 25, 24, 24, 26, 23, 26, 27, 26, 26, 27, 27, 27, 27, 27, 28, 27, 27, 27, 27, 27, 26, 30,
];

const EOS: u16 = 256;
const LEAF: u16 = 0x8000;

/// The canonical code of each symbol, as (code, length).
fn huffman_codes() -> Vec<(u32, u8)> {
    let mut order: Vec<usize> = (0..HUFFMAN_CODE_LENGTHS.len()).collect();
    order.sort_by_key(|&s| (HUFFMAN_CODE_LENGTHS[s], s));
    let mut codes = vec![(0u32, 0u8); HUFFMAN_CODE_LENGTHS.len()];
    let mut code = 0u32;
    let mut previous_len = 0u8;
    for (i, &symbol) in order.iter().enumerate() {
        let len = HUFFMAN_CODE_LENGTHS[symbol];
        if i > 0 {
            code = (code + 1) << (len - previous_len);
        }
        previous_len = len;
        codes[symbol] = (code, len);
    }
    codes
}

/// The decoding tree: node i's children for bit 0 and 1; a child is an
/// inner node index, or `LEAF | symbol`. Node 0 is the root, so 0 as a
/// child means "no such code".
static HUFFMAN_TREE: LazyLock<Vec<[u16; 2]>> = LazyLock::new(|| {
    let mut nodes: Vec<[u16; 2]> = vec![[0, 0]];
    for (symbol, (code, len)) in huffman_codes().into_iter().enumerate() {
        let mut node = 0usize;
        for i in (0..len).rev() {
            let bit = ((code >> i) & 1) as usize;
            if i == 0 {
                nodes[node][bit] = LEAF | symbol as u16;
            } else {
                if nodes[node][bit] == 0 {
                    nodes.push([0, 0]);
                    nodes[node][bit] = (nodes.len() - 1) as u16;
                }
                node = usize::from(nodes[node][bit]);
            }
        }
    }
    nodes
});

fn huffman_decode(raw: &[u8]) -> io::Result<Vec<u8>> {
    let tree = &*HUFFMAN_TREE;
    let mut out = Vec::with_capacity(raw.len() * 8 / 5);
    let mut node = 0usize;
    // Bits since the last symbol, and whether all were ones: what may
    // legally be left over as padding (RFC 7541 §5.2).
    let mut pending_bits = 0u32;
    let mut all_ones = true;
    for &byte in raw {
        for i in (0..8).rev() {
            let bit = (byte >> i) & 1;
            let next = tree
                .get(node)
                .map_or(0, |children| children[usize::from(bit)]);
            pending_bits += 1;
            all_ones &= bit == 1;
            if next & LEAF != 0 {
                let symbol = next & !LEAF;
                if symbol == EOS {
                    return Err(malformed("EOS inside a Huffman string"));
                }
                out.push(symbol as u8);
                node = 0;
                pending_bits = 0;
                all_ones = true;
            } else if next == 0 {
                return Err(malformed("invalid Huffman code"));
            } else {
                node = usize::from(next);
            }
        }
    }
    if pending_bits > 7 || !all_ones {
        return Err(malformed("bad Huffman padding"));
    }
    Ok(out)
}

/// RFC 7541 Appendix A.
const STATIC_TABLE: [(&[u8], &[u8]); 61] = [
    (b":authority", b""),
    (b":method", b"GET"),
    (b":method", b"POST"),
    (b":path", b"/"),
    (b":path", b"/index.html"),
    (b":scheme", b"http"),
    (b":scheme", b"https"),
    (b":status", b"200"),
    (b":status", b"204"),
    (b":status", b"206"),
    (b":status", b"304"),
    (b":status", b"400"),
    (b":status", b"404"),
    (b":status", b"500"),
    (b"accept-charset", b""),
    (b"accept-encoding", b"gzip, deflate"),
    (b"accept-language", b""),
    (b"accept-ranges", b""),
    (b"accept", b""),
    (b"access-control-allow-origin", b""),
    (b"age", b""),
    (b"allow", b""),
    (b"authorization", b""),
    (b"cache-control", b""),
    (b"content-disposition", b""),
    (b"content-encoding", b""),
    (b"content-language", b""),
    (b"content-length", b""),
    (b"content-location", b""),
    (b"content-range", b""),
    (b"content-type", b""),
    (b"cookie", b""),
    (b"date", b""),
    (b"etag", b""),
    (b"expect", b""),
    (b"expires", b""),
    (b"from", b""),
    (b"host", b""),
    (b"if-match", b""),
    (b"if-modified-since", b""),
    (b"if-none-match", b""),
    (b"if-range", b""),
    (b"if-unmodified-since", b""),
    (b"last-modified", b""),
    (b"link", b""),
    (b"location", b""),
    (b"max-forwards", b""),
    (b"proxy-authenticate", b""),
    (b"proxy-authorization", b""),
    (b"range", b""),
    (b"referer", b""),
    (b"refresh", b""),
    (b"retry-after", b""),
    (b"server", b""),
    (b"set-cookie", b""),
    (b"strict-transport-security", b""),
    (b"transfer-encoding", b""),
    (b"user-agent", b""),
    (b"vary", b""),
    (b"via", b""),
    (b"www-authenticate", b""),
];

#[cfg(test)]
mod tests {
    use super::*;

    fn hex(s: &str) -> Vec<u8> {
        let s: String = s.chars().filter(|c| !c.is_whitespace()).collect();
        (0..s.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap())
            .collect()
    }

    fn pairs(fields: &[Field]) -> Vec<(String, String)> {
        fields
            .iter()
            .map(|f| {
                (
                    String::from_utf8(f.name.clone()).unwrap(),
                    String::from_utf8(f.value.clone()).unwrap(),
                )
            })
            .collect()
    }

    fn p(name: &str, value: &str) -> (String, String) {
        (name.into(), value.into())
    }

    #[test]
    fn canonical_codes_match_the_rfc() {
        let codes = huffman_codes();
        // A few codes straight from RFC 7541 Appendix B.
        assert_eq!(codes[usize::from(b'0')], (0x0, 5));
        assert_eq!(codes[usize::from(b'a')], (0x3, 5));
        assert_eq!(codes[usize::from(b' ')], (0x14, 6));
        assert_eq!(codes[usize::from(b'%')], (0x15, 6));
        assert_eq!(codes[usize::from(b'/')], (0x18, 6));
        assert_eq!(codes[0], (0x1ff8, 13));
        assert_eq!(codes[255], (0x3ffffee, 26));
        assert_eq!(codes[256], (0x3fffffff, 30));
    }

    /// RFC 7541 C.3: requests without Huffman coding, sharing a table.
    #[test]
    fn rfc_7541_c3_requests() {
        let mut d = Decoder::new();
        let first = d
            .decode(&hex("828684410f7777772e6578616d706c652e636f6d"))
            .unwrap();
        assert_eq!(
            pairs(&first),
            [
                p(":method", "GET"),
                p(":scheme", "http"),
                p(":path", "/"),
                p(":authority", "www.example.com")
            ]
        );
        let second = d.decode(&hex("828684be58086e6f2d6361636865")).unwrap();
        assert_eq!(
            pairs(&second),
            [
                p(":method", "GET"),
                p(":scheme", "http"),
                p(":path", "/"),
                p(":authority", "www.example.com"),
                p("cache-control", "no-cache")
            ]
        );
        let third = d
            .decode(&hex(
                "828785bf400a637573746f6d2d6b65790c637573746f6d2d76616c7565",
            ))
            .unwrap();
        assert_eq!(
            pairs(&third),
            [
                p(":method", "GET"),
                p(":scheme", "https"),
                p(":path", "/index.html"),
                p(":authority", "www.example.com"),
                p("custom-key", "custom-value")
            ]
        );
        assert_eq!(d.size, 164);
    }

    /// RFC 7541 C.4: the same requests with Huffman coding.
    #[test]
    fn rfc_7541_c4_requests_with_huffman() {
        let mut d = Decoder::new();
        let first = d
            .decode(&hex("828684418cf1e3c2e5f23a6ba0ab90f4ff"))
            .unwrap();
        assert_eq!(first[3].value, b"www.example.com");
        let second = d.decode(&hex("828684be5886a8eb10649cbf")).unwrap();
        assert_eq!(
            second[4],
            Field {
                name: b"cache-control".to_vec(),
                value: b"no-cache".to_vec(),
                never_indexed: false,
            }
        );
        let third = d
            .decode(&hex("828785bf408825a849e95ba97d7f8925a849e95bb8e8b4bf"))
            .unwrap();
        assert_eq!(pairs(&third)[4], p("custom-key", "custom-value"));
        assert_eq!(d.size, 164);
    }

    #[test]
    fn huffman_rejects_bad_padding_and_eos() {
        // "a" is 00011; padded with ones: 00011111.
        assert_eq!(huffman_decode(&[0b0001_1111]).unwrap(), b"a");
        // Padded with a zero bit.
        assert!(huffman_decode(&[0b0001_1110]).is_err());
        // Eight bits of padding.
        assert!(huffman_decode(&[0b0001_1111, 0xff]).is_err());
        // EOS (30 ones) inside the string.
        assert!(huffman_decode(&[0xff, 0xff, 0xff, 0xff]).is_err());
    }

    #[test]
    fn encoding_round_trips() {
        let fields = vec![
            Field {
                name: b":authority".to_vec(),
                value: b"x".repeat(300),
                never_indexed: false,
            },
            Field {
                name: b"secret".to_vec(),
                value: b"s".to_vec(),
                never_indexed: true,
            },
            Field {
                name: Vec::new(),
                value: Vec::new(),
                never_indexed: false,
            },
        ];
        let mut d = Decoder::new();
        assert_eq!(d.decode(&encode(&fields)).unwrap(), fields);
        assert!(d.table.is_empty(), "literals never touch the table");
    }

    #[test]
    fn table_size_updates_and_eviction() {
        let mut d = Decoder::new();
        // Size update to 0 empties the table; then a literal with indexing.
        let mut block = vec![0x20, 0x40, 0x01, b'a', 0x01, b'b'];
        assert_eq!(pairs(&d.decode(&block).unwrap()), [p("a", "b")]);
        assert!(
            d.table.is_empty(),
            "an entry larger than the table is not kept"
        );
        // Update after a field is an error.
        block = vec![0x82, 0x3f, 0x01];
        assert!(d.decode(&block).is_err());
        // Too large an update is an error.
        let mut too_big = Vec::new();
        encode_int(&mut too_big, MAX_TABLE_SIZE + 1, 5, 0x20);
        assert!(d.decode(&too_big).is_err());
    }

    fn frame(kind: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
        let mut out = Vec::new();
        write_frame_header(&mut out, payload.len(), kind, flags, stream);
        out.extend_from_slice(payload);
        out
    }

    /// Splits rewritten output back into frames: (type, flags, stream, payload).
    fn parse_frames(mut bytes: &[u8]) -> Vec<(u8, u8, u32, Vec<u8>)> {
        let mut frames = Vec::new();
        while !bytes.is_empty() {
            let len =
                usize::from(bytes[0]) << 16 | usize::from(bytes[1]) << 8 | usize::from(bytes[2]);
            let stream = u32::from_be_bytes([bytes[5], bytes[6], bytes[7], bytes[8]]);
            frames.push((bytes[3], bytes[4], stream, bytes[9..9 + len].to_vec()));
            bytes = &bytes[9 + len..];
        }
        frames
    }

    #[test]
    fn rewrites_the_authority_and_leaves_other_frames_alone() {
        // grpcio's :authority for a unix: channel, Huffman-free.
        let mut block = vec![0x83, 0x86, 0x41];
        let authority = b"tmp%2Fdbg%2Fapi.sock";
        block.push(authority.len() as u8);
        block.extend_from_slice(authority);
        block.extend_from_slice(&[0x44, 0x05]);
        block.extend_from_slice(b"/a/bc");
        let settings = frame(0x4, 0, 0, &[0, 3, 0, 0, 0, 100]);
        // HEADERS padded with 3 bytes and with priority, split across a
        // CONTINUATION; then DATA.
        let mut headers_payload = vec![3];
        headers_payload.extend_from_slice(&[0, 0, 0, 0, 16]);
        headers_payload.extend_from_slice(&block[..4]);
        headers_payload.extend_from_slice(&[0, 0, 0]);
        let headers = frame(
            TYPE_HEADERS,
            FLAG_PADDED | FLAG_PRIORITY | FLAG_END_STREAM,
            1,
            &headers_payload,
        );
        let continuation = frame(TYPE_CONTINUATION, FLAG_END_HEADERS, 1, &block[4..]);
        let data = frame(0x0, 0x1, 1, b"payload");

        let mut input = PREFACE.to_vec();
        for part in [&settings, &headers, &continuation, &data] {
            input.extend_from_slice(part);
        }
        // Byte by byte, to exercise every partial-input path.
        let mut rewriter = Rewriter::new();
        let mut out = Vec::new();
        for byte in &input {
            rewriter.feed(std::slice::from_ref(byte), &mut out).unwrap();
        }
        assert_eq!(&out[..PREFACE.len()], PREFACE);
        let frames = parse_frames(&out[PREFACE.len()..]);
        assert_eq!(frames.len(), 3);
        assert_eq!(frames[0], (0x4, 0, 0, vec![0, 3, 0, 0, 0, 100]));
        let (kind, flags, stream, payload) = &frames[1];
        assert_eq!((*kind, *stream), (TYPE_HEADERS, 1));
        assert_eq!(*flags, FLAG_PRIORITY | FLAG_END_STREAM | FLAG_END_HEADERS);
        assert_eq!(&payload[..5], &[0, 0, 0, 0, 16]);
        let fields = Decoder::new().decode(&payload[5..]).unwrap();
        assert_eq!(
            pairs(&fields),
            [
                p(":method", "POST"),
                p(":scheme", "http"),
                p(":authority", "localhost"),
                p(":path", "/a/bc")
            ]
        );
        assert_eq!(frames[2], (0x0, 0x1, 1, b"payload".to_vec()));
    }

    #[test]
    fn a_dynamic_table_entry_is_followed_across_blocks() {
        let mut rewriter = Rewriter::new();
        let mut out = Vec::new();
        rewriter.feed(PREFACE, &mut out).unwrap();
        // First request indexes the authority; the second refers to it.
        let mut first = vec![0x41, 0x04];
        first.extend_from_slice(b"/x/y");
        let second = vec![0xbe];
        let mut input = frame(TYPE_HEADERS, FLAG_END_HEADERS, 1, &first);
        input.extend(frame(TYPE_HEADERS, FLAG_END_HEADERS, 3, &second));
        out.clear();
        rewriter.feed(&input, &mut out).unwrap();
        for (_, _, _, payload) in parse_frames(&out) {
            let fields = Decoder::new().decode(&payload).unwrap();
            assert_eq!(pairs(&fields), [p(":authority", "localhost")]);
        }
    }

    #[test]
    fn large_blocks_are_split_into_continuations() {
        let fields: Vec<Field> = (0..40)
            .map(|i| Field {
                name: format!("x-{i}").into_bytes(),
                value: vec![b'v'; 1000],
                never_indexed: false,
            })
            .collect();
        let block = PendingBlock {
            stream_id: 5,
            end_stream: false,
            priority: None,
            fragment: Vec::new(),
        };
        let mut out = Vec::new();
        let encoded = encode(&fields);
        write_header_frames(&block, &encoded, &mut out);
        let frames = parse_frames(&out);
        assert!(frames.len() >= 3);
        assert_eq!(frames[0].0, TYPE_HEADERS);
        assert_eq!(frames[0].1 & FLAG_END_HEADERS, 0);
        let last = frames.last().unwrap();
        assert_eq!((last.0, last.1), (TYPE_CONTINUATION, FLAG_END_HEADERS));
        assert!(frames.iter().all(|f| f.3.len() <= MAX_FRAME_PAYLOAD));
        let joined: Vec<u8> = frames.iter().flat_map(|f| f.3.clone()).collect();
        assert_eq!(joined, encoded);
    }

    #[test]
    fn other_protocols_pass_through() {
        let mut rewriter = Rewriter::new();
        let mut out = Vec::new();
        rewriter.feed(b"PRI * HTTP/1.1\r\n", &mut out).unwrap();
        rewriter.feed(b"anything", &mut out).unwrap();
        assert_eq!(out, b"PRI * HTTP/1.1\r\nanything");
        let mut rewriter = Rewriter::new();
        out.clear();
        rewriter.feed(b"GET / HTTP/1.1\r\n\r\n", &mut out).unwrap();
        assert_eq!(out, b"GET / HTTP/1.1\r\n\r\n");
    }

    #[test]
    fn garbage_is_an_error_never_a_panic() {
        // A small deterministic generator; no dependency needed.
        let mut state = 0x2545_f491_4f6c_dd1du64;
        let mut next = || {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state
        };
        for round in 0..2000 {
            let len = (next() % 64) as usize;
            let block: Vec<u8> = (0..len).map(|_| next() as u8).collect();
            let _ = Decoder::new().decode(&block);
            let _ = huffman_decode(&block);
            let mut rewriter = Rewriter::new();
            let mut out = Vec::new();
            let _ = rewriter.feed(PREFACE, &mut out);
            let kind = if round % 2 == 0 {
                TYPE_HEADERS
            } else {
                TYPE_CONTINUATION
            };
            let flags = next() as u8;
            let _ = rewriter.feed(&frame(kind, flags, 1, &block), &mut out);
            let _ = rewriter.feed(&block, &mut out);
        }
        // Two specific cases: a CONTINUATION out of the blue, and a frame
        // interrupting a header block.
        let mut rewriter = Rewriter::new();
        let mut out = Vec::new();
        rewriter.feed(PREFACE, &mut out).unwrap();
        assert!(rewriter
            .feed(
                &frame(TYPE_CONTINUATION, FLAG_END_HEADERS, 1, &[0x82]),
                &mut out
            )
            .is_err());
        let mut rewriter = Rewriter::new();
        rewriter.feed(PREFACE, &mut out).unwrap();
        rewriter
            .feed(&frame(TYPE_HEADERS, 0, 1, &[0x82]), &mut out)
            .unwrap();
        assert!(rewriter.feed(&frame(0x0, 0, 1, b"x"), &mut out).is_err());
    }
}
