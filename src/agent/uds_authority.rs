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
//! block is decoded by one `loona_hpack` decoder per connection (static
//! and dynamic tables, Huffman), its `:authority` set to `localhost` (what
//! grpc-go sends over Unix sockets), and re-encoded with literals only, so
//! that the server's decoder needs no dynamic table state. Padding is
//! dropped; the priority fields and the END_STREAM flag are kept. Input
//! that does not start with the HTTP/2 preface is passed through as it is.
//! Malformed HPACK or framing ends the connection, as h2 itself would.
//!
//! `loona_hpack` (bearcove's fork of the `hpack` crate) returns errors
//! rather than panicking on malformed input, and refuses table size
//! updates above a set maximum; the limits it lacks are kept here: the
//! size of the header block and of the decoded header list, and the
//! framing. It differs from h2 in corners no real client reaches, all
//! harmless since the server only sees our re-encoding: a table size
//! update in the middle of a block is accepted, a block holding only a
//! size update is refused, and the "never indexed" flag is not reported,
//! so such fields are re-sent as plain literals (the server is the last
//! hop; nothing after it indexes them).
//!
//! Only the client-to-server direction is touched; writes go straight to
//! the socket. Header blocks are small (a Workload API request has a
//! handful of short headers), so they are bounded tightly.

use std::fmt::Display;
use std::io;
use std::pin::Pin;
use std::task::{ready, Context, Poll};

use loona_hpack::encoder::encode_integer_into;
use loona_hpack::Decoder;
use tokio::io::{AsyncRead, ReadBuf};
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
/// Largest header block accepted, compressed or decoded: the
/// SETTINGS_MAX_HEADER_LIST_SIZE the server (hyper's default, which tonic
/// keeps) advertises and enforces, so nothing it would accept is refused.
/// It also bounds decoding time: `loona_hpack` builds a fresh Huffman
/// table for every Huffman-coded string (bearcove/loona#229), about 20 µs
/// each in a release build, and a block can hold one every two bytes.
const MAX_HEADER_BLOCK: usize = 16 * 1024;
/// Largest dynamic table size update accepted. (The table starts at 4096,
/// the HTTP/2 default, which tonic leaves as it is.)
const MAX_TABLE_SIZE: usize = 64 * 1024;
/// Per RFC 7541 §4.1, the overhead counted for each table entry.
const ENTRY_OVERHEAD: usize = 32;

const AUTHORITY: &[u8] = b":authority";
const REPLACEMENT_AUTHORITY: &[u8] = b"localhost";

fn malformed(what: impl Display) -> io::Error {
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

crate::write_through::write_through!(inner for [] FixedAuthority);

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
    /// One decoder for the whole connection: it must see every header
    /// block, in order, to follow the client's dynamic table.
    decoder: Decoder<'static>,
}

impl Rewriter {
    fn new() -> Self {
        Self {
            phase: Phase::Preface(0),
            pending: Vec::new(),
            passthrough: 0,
            block: None,
            decoder: new_decoder(),
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
        let mut fields = decode(&mut self.decoder, &block.fragment)?;
        for (name, value) in &mut fields {
            if name == AUTHORITY {
                *value = REPLACEMENT_AUTHORITY.to_vec();
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

/// A decoded header field: name and value.
type Field = (Vec<u8>, Vec<u8>);

/// The connection's HPACK decoder, mirroring the client's dynamic table.
/// It starts at the table size of RFC 7541 / HTTP/2 (4096) and refuses
/// updates beyond [`MAX_TABLE_SIZE`].
fn new_decoder() -> Decoder<'static> {
    let mut decoder = Decoder::new();
    decoder.set_max_allowed_table_size(MAX_TABLE_SIZE);
    decoder
}

/// Decodes one complete header block. The decoded header list is bounded
/// by [`MAX_HEADER_BLOCK`], counted as HTTP/2 does (RFC 7540 §6.5.2): a
/// block can refer to the same large table entry many times.
fn decode(decoder: &mut Decoder<'_>, block: &[u8]) -> io::Result<Vec<Field>> {
    let mut fields = Vec::new();
    let mut list_size = 0usize;
    decoder
        .decode_with_cb(block, |name, value| {
            list_size = list_size.saturating_add(name.len() + value.len() + ENTRY_OVERHEAD);
            if list_size <= MAX_HEADER_BLOCK {
                fields.push((name.into_owned(), value.into_owned()));
            }
        })
        .map_err(|e| malformed(format!("HPACK: {e}")))?;
    if list_size > MAX_HEADER_BLOCK {
        return Err(malformed("header list too large"));
    }
    Ok(fields)
}

/// Encodes fields as "literal without indexing" with literal names and raw
/// strings (RFC 7541 §6.2.2): no dynamic table, no Huffman, so the server's
/// decoder needs no state from us, whatever table size it advertises.
/// `loona_hpack::Encoder` has no such mode (it indexes new names), so only
/// its integer encoding is used.
fn encode(fields: &[Field]) -> Vec<u8> {
    let mut out = Vec::new();
    for (name, value) in fields {
        out.push(0x00); // literal without indexing, literal name follows
        for s in [name, value] {
            encode_integer_into(s.len(), 7, 0x00, &mut out).expect("writing to a Vec cannot fail");
            out.extend_from_slice(s);
        }
    }
    out
}

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
            .map(|(name, value)| {
                (
                    String::from_utf8(name.clone()).unwrap(),
                    String::from_utf8(value.clone()).unwrap(),
                )
            })
            .collect()
    }

    fn p(name: &str, value: &str) -> (String, String) {
        (name.into(), value.into())
    }

    /// The dynamic table after the three requests of RFC 7541 C.3 / C.4,
    /// read back through indices 62-64.
    fn assert_c3_table(d: &mut Decoder<'_>) {
        assert_eq!(
            pairs(&decode(d, &[0xbe, 0xbf, 0xc0]).unwrap()),
            [
                p("custom-key", "custom-value"),
                p("cache-control", "no-cache"),
                p(":authority", "www.example.com")
            ]
        );
        assert!(decode(d, &[0xc1]).is_err(), "only three entries");
    }

    /// RFC 7541 C.3: requests without Huffman coding, sharing a table.
    #[test]
    fn rfc_7541_c3_requests() {
        let mut d = new_decoder();
        let first = decode(&mut d, &hex("828684410f7777772e6578616d706c652e636f6d")).unwrap();
        assert_eq!(
            pairs(&first),
            [
                p(":method", "GET"),
                p(":scheme", "http"),
                p(":path", "/"),
                p(":authority", "www.example.com")
            ]
        );
        let second = decode(&mut d, &hex("828684be58086e6f2d6361636865")).unwrap();
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
        let third = decode(
            &mut d,
            &hex("828785bf400a637573746f6d2d6b65790c637573746f6d2d76616c7565"),
        )
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
        assert_c3_table(&mut d);
    }

    /// RFC 7541 C.4: the same requests with Huffman coding.
    #[test]
    fn rfc_7541_c4_requests_with_huffman() {
        let mut d = new_decoder();
        let first = decode(&mut d, &hex("828684418cf1e3c2e5f23a6ba0ab90f4ff")).unwrap();
        assert_eq!(pairs(&first)[3], p(":authority", "www.example.com"));
        let second = decode(&mut d, &hex("828684be5886a8eb10649cbf")).unwrap();
        assert_eq!(pairs(&second)[4], p("cache-control", "no-cache"));
        let third = decode(
            &mut d,
            &hex("828785bf408825a849e95ba97d7f8925a849e95bb8e8b4bf"),
        )
        .unwrap();
        assert_eq!(pairs(&third)[4], p("custom-key", "custom-value"));
        assert_c3_table(&mut d);
    }

    #[test]
    fn huffman_rejects_bad_padding_and_eos() {
        // A field with a literal name and the given Huffman-coded value.
        let block = |value: &[u8]| {
            let mut b = vec![0x00, 0x01, b'n', 0x80 | value.len() as u8];
            b.extend_from_slice(value);
            b
        };
        // "a" is 00011; padded with ones: 00011111.
        let fields = decode(&mut new_decoder(), &block(&[0b0001_1111])).unwrap();
        assert_eq!(pairs(&fields), [p("n", "a")]);
        // Padded with a zero bit.
        assert!(decode(&mut new_decoder(), &block(&[0b0001_1110])).is_err());
        // Eight bits of padding.
        assert!(decode(&mut new_decoder(), &block(&[0b0001_1111, 0xff])).is_err());
        // EOS (30 ones) inside the string.
        assert!(decode(&mut new_decoder(), &block(&[0xff, 0xff, 0xff, 0xff])).is_err());
    }

    #[test]
    fn encoding_round_trips_without_touching_the_table() {
        let fields = vec![
            (b":authority".to_vec(), b"x".repeat(300)),
            (b"secret".to_vec(), b"s".to_vec()),
            (Vec::new(), Vec::new()),
        ];
        let mut d = new_decoder();
        assert_eq!(decode(&mut d, &encode(&fields)).unwrap(), fields);
        assert!(decode(&mut d, &[0xbe]).is_err(), "literals are not indexed");
    }

    #[test]
    fn table_size_updates_and_eviction() {
        let mut d = new_decoder();
        // Size update to 0 empties the table; then a literal with indexing.
        let block = [0x20, 0x40, 0x01, b'a', 0x01, b'b'];
        assert_eq!(pairs(&decode(&mut d, &block).unwrap()), [p("a", "b")]);
        assert!(
            decode(&mut d, &[0xbe]).is_err(),
            "an entry larger than the table is not kept"
        );
        // An update ending the block is an error.
        assert!(decode(&mut d, &[0x82, 0x3f, 0x01]).is_err());
        // The largest update allowed, then one too large.
        let mut largest = Vec::new();
        encode_integer_into(MAX_TABLE_SIZE, 5, 0x20, &mut largest).unwrap();
        largest.push(0x82);
        assert!(decode(&mut new_decoder(), &largest).is_ok());
        let mut too_big = Vec::new();
        encode_integer_into(MAX_TABLE_SIZE + 1, 5, 0x20, &mut too_big).unwrap();
        too_big.push(0x82);
        assert!(decode(&mut new_decoder(), &too_big).is_err());
    }

    #[test]
    fn the_decoded_header_list_is_bounded() {
        // One 4000-byte entry (4033 bytes as counted), then referred to by
        // one byte each time.
        let mut block = vec![0x40, 0x01, b'a'];
        encode_integer_into(4000, 7, 0x00, &mut block).unwrap();
        block.extend_from_slice(&[b'v'; 4000]);
        let mut d = new_decoder();
        assert_eq!(decode(&mut d, &block).unwrap().len(), 1);
        let fit = MAX_HEADER_BLOCK / 4033;
        assert_eq!(decode(&mut d, &vec![0xbe; fit]).unwrap().len(), fit);
        assert!(decode(&mut d, &vec![0xbe; fit + 1]).is_err());
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
        let fields = decode(&mut new_decoder(), &payload[5..]).unwrap();
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
        let frames = parse_frames(&out);
        assert_eq!(frames.len(), 2);
        for (_, _, _, payload) in frames {
            // Each rewritten block decodes on its own, with no table state.
            let fields = decode(&mut new_decoder(), &payload).unwrap();
            assert_eq!(pairs(&fields), [p(":authority", "localhost")]);
        }
    }

    #[test]
    fn large_blocks_are_split_into_continuations() {
        let fields: Vec<Field> = (0..40)
            .map(|i| (format!("x-{i}").into_bytes(), vec![b'v'; 1000]))
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
        // One decoder across all rounds too, so that garbage also meets a
        // table filled by earlier garbage.
        let mut shared = new_decoder();
        for round in 0..5000 {
            let len = (next() % 64) as usize;
            let block: Vec<u8> = (0..len).map(|_| next() as u8).collect();
            let _ = decode(&mut new_decoder(), &block);
            let _ = decode(&mut shared, &block);
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
