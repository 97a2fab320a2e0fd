//! RFC 6455 frames: in-place decoding of (masked) client frames, encoding of (unmasked) server frames,
//! and the client role (unmasked server frames in, masked frames out) for load generators and tests.

use bytes::Bytes;

pub const OP_CONTINUATION: u8 = 0x0;
pub const OP_TEXT: u8 = 0x1;
pub const OP_BINARY: u8 = 0x2;
pub const OP_CLOSE: u8 = 0x8;
pub const OP_PING: u8 = 0x9;
pub const OP_PONG: u8 = 0xA;

/// Largest server frame header: 2 bytes + 8 bytes of extended length (server frames carry no mask).
pub const MAX_HEADER: usize = 10;

/// Largest client frame header: 2 bytes + 8 bytes of extended length + 4 bytes of mask.
pub const MAX_CLIENT_HEADER: usize = 14;

/// Largest payload of a control frame (RFC 6455 §5.5).
pub const MAX_CONTROL_PAYLOAD: usize = 125;

/// Why the decoder gave up: the connection must be closed with `code()`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CloseReason {
    /// Protocol violation (unmasked frame, reserved bits, bad opcode, bad continuation,
    /// fragmented or oversized control frame, bad close payload): 1002.
    Protocol(&'static str),
    /// A text message or close reason that is not valid UTF-8: 1007.
    InvalidUtf8,
    /// A message (or a single frame's declared length) larger than `max_message_size`: 1009.
    TooBig,
}

impl CloseReason {
    pub fn code(self) -> u16 {
        match self {
            CloseReason::Protocol(_) => 1002,
            CloseReason::InvalidUtf8 => 1007,
            CloseReason::TooBig => 1009,
        }
    }

    /// A short text for the close frame's reason and the logs.
    pub fn text(self) -> &'static str {
        match self {
            CloseReason::Protocol(why) => why,
            CloseReason::InvalidUtf8 => "invalid UTF-8",
            CloseReason::TooBig => "message too big",
        }
    }
}

impl std::fmt::Display for CloseReason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} ({})", self.text(), self.code())
    }
}

/// One complete message (data messages are reassembled from their fragments).
#[derive(Debug, PartialEq, Eq)]
pub enum Message<'a> {
    Text(&'a str),
    Binary(&'a [u8]),
    Ping(&'a [u8]),
    Pong(&'a [u8]),
    /// A close frame: the status code (`None` for an empty payload) and the reason text.
    Close(Option<u16>, &'a str),
}

/// A decoded message that owns its payload, for keeping past the decoder's buffer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum OwnedMessage {
    Text(String),
    Binary(Vec<u8>),
    Ping(Vec<u8>),
    Pong(Vec<u8>),
    Close(Option<u16>, String),
}

impl Message<'_> {
    pub fn to_owned_message(&self) -> OwnedMessage {
        match *self {
            Message::Text(t) => OwnedMessage::Text(t.to_owned()),
            Message::Binary(b) => OwnedMessage::Binary(b.to_vec()),
            Message::Ping(b) => OwnedMessage::Ping(b.to_vec()),
            Message::Pong(b) => OwnedMessage::Pong(b.to_vec()),
            Message::Close(code, reason) => OwnedMessage::Close(code, reason.to_owned()),
        }
    }
}

/// Whether the decoder should go on with the rest of the buffer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Flow {
    Continue,
    Stop,
}

/// A parsed frame header.
#[derive(Debug, Clone, Copy)]
struct Header {
    fin: bool,
    opcode: u8,
    /// The masking key; `None` for a server frame read in the client role.
    mask: Option<[u8; 4]>,
    /// Header length in bytes (6, 8 or 14 masked; 2, 4 or 10 unmasked).
    len: usize,
    payload: usize,
}

impl Header {
    fn frame_len(&self) -> usize {
        self.len.saturating_add(self.payload)
    }
}

enum Parsed {
    /// The header needs this many bytes in total.
    Need(usize),
    Frame(Header),
}

const fn protocol(why: &'static str) -> CloseReason {
    CloseReason::Protocol(why)
}

/// Parses a frame header, checking everything the header alone decides. The server role
/// (`client_role` false) requires masked frames, the client role unmasked ones.
#[inline]
fn parse_header(b: &[u8], client_role: bool) -> Result<Parsed, CloseReason> {
    let Some(&b0) = b.first() else {
        return Ok(Parsed::Need(2));
    };
    if b0 & 0x70 != 0 {
        return Err(protocol("reserved bits set without a negotiated extension"));
    }
    let fin = b0 & 0x80 != 0;
    let opcode = b0 & 0x0F;
    let control = opcode & 0x08 != 0;
    if !matches!(
        opcode,
        OP_CONTINUATION | OP_TEXT | OP_BINARY | OP_CLOSE | OP_PING | OP_PONG
    ) {
        return Err(protocol("reserved opcode"));
    }
    if control && !fin {
        return Err(protocol("fragmented control frame"));
    }
    let Some(&b1) = b.get(1) else {
        return Ok(Parsed::Need(2));
    };
    let masked = b1 & 0x80 != 0;
    if !masked && !client_role {
        return Err(protocol("unmasked client frame"));
    }
    if masked && client_role {
        return Err(protocol("masked server frame"));
    }
    let len7 = b1 & 0x7F;
    if control && usize::from(len7) > MAX_CONTROL_PAYLOAD {
        return Err(protocol("control frame payload over 125 bytes"));
    }
    let mask_len = if masked { 4 } else { 0 };
    let len = mask_len
        + match len7 {
            126 => 4,
            127 => 10,
            _ => 2,
        };
    let Some(head) = b.get(..len) else {
        return Ok(Parsed::Need(len));
    };
    let payload = match len7 {
        126 => u64::from(u16::from_be_bytes([head[2], head[3]])),
        127 => {
            let n = u64::from_be_bytes([
                head[2], head[3], head[4], head[5], head[6], head[7], head[8], head[9],
            ]);
            if n >> 63 != 0 {
                return Err(protocol("64-bit payload length with the top bit set"));
            }
            n
        }
        n => u64::from(n),
    };
    Ok(Parsed::Frame(Header {
        fin,
        opcode,
        mask: masked.then(|| [head[len - 4], head[len - 3], head[len - 2], head[len - 1]]),
        len,
        payload: usize::try_from(payload).unwrap_or(usize::MAX),
    }))
}

/// XORs `buf` with the 4-byte `mask` (client frames, RFC 6455 §5.3), 8 bytes at a time.
#[inline]
pub fn apply_mask(buf: &mut [u8], mask: [u8; 4]) {
    let [a, b, c, d] = mask;
    let wide = u64::from_ne_bytes([a, b, c, d, a, b, c, d]);
    let mut chunks = buf.chunks_exact_mut(8);
    for chunk in &mut chunks {
        if let Ok(word) = <&mut [u8; 8]>::try_from(chunk) {
            *word = (u64::from_ne_bytes(*word) ^ wide).to_ne_bytes();
        }
    }
    // Whole words cover a multiple of 4 bytes, so the rest starts at mask index 0.
    for (i, byte) in chunks.into_remainder().iter_mut().enumerate() {
        *byte ^= mask[i & 3];
    }
}

/// Valid status codes in a received close frame (RFC 6455 §7.4, IANA registry).
pub fn is_valid_close_code(code: u16) -> bool {
    matches!(code, 1000..=1003 | 1007..=1014 | 3000..=4999)
}

fn close_message(payload: &[u8]) -> Result<Message<'_>, CloseReason> {
    match payload {
        [] => Ok(Message::Close(None, "")),
        [_] => Err(protocol("close payload of 1 byte")),
        [hi, lo, reason @ ..] => {
            let code = u16::from_be_bytes([*hi, *lo]);
            if !is_valid_close_code(code) {
                return Err(protocol("invalid close code"));
            }
            let reason = std::str::from_utf8(reason).map_err(|_| CloseReason::InvalidUtf8)?;
            Ok(Message::Close(Some(code), reason))
        }
    }
}

/// Incremental decoder of one connection's frames: masked client frames (`new`, the
/// gateway's role) or unmasked server frames (`new_client`, the role of a client).
///
/// Holds no heap memory while idle: bytes are kept only when a frame is split across
/// reads (the tail) or a fragmented message is being reassembled.
#[derive(Debug)]
pub struct Decoder {
    max_message_size: usize,
    /// Raw bytes of a frame split across reads (header and masked payload).
    tail: Vec<u8>,
    /// Unmasked payload of the fragmented message in progress.
    frag: Vec<u8>,
    /// Opcode of the fragmented message in progress; `OP_CONTINUATION` when none.
    frag_opcode: u8,
    /// Length of the prefix of `frag` known to be valid UTF-8 (text messages).
    frag_valid: usize,
    /// Client role: frames must be unmasked, and a masked one is a protocol error.
    client_role: bool,
}

impl Decoder {
    /// A decoder in the server role: it accepts masked client frames only.
    pub fn new(max_message_size: usize) -> Self {
        Decoder {
            max_message_size,
            tail: Vec::new(),
            frag: Vec::new(),
            frag_opcode: OP_CONTINUATION,
            frag_valid: 0,
            client_role: false,
        }
    }

    /// A decoder in the client role: it accepts unmasked server frames only
    /// (RFC 6455 §5.1: a client closes on a masked frame).
    pub fn new_client(max_message_size: usize) -> Self {
        Decoder {
            client_role: true,
            ..Decoder::new(max_message_size)
        }
    }

    /// Decodes every complete message in `buf`, unmasking in place, and calls `on_message`
    /// for each in order. Bytes of an incomplete frame are kept for the next call.
    /// Returning `Flow::Stop` from `on_message` discards the rest of `buf`.
    /// An `Err` means: send a close frame with `reason.code()` and close.
    pub fn decode(
        &mut self,
        buf: &mut [u8],
        mut on_message: impl FnMut(Message<'_>) -> Flow,
    ) -> Result<(), CloseReason> {
        let mut pos = 0;
        if !self.tail.is_empty() {
            let Some((header, used)) = self.fill_tail(buf)? else {
                return Ok(());
            };
            pos = used;
            // Taking the tail out frees its allocation once the frame is handled.
            let mut tail = std::mem::take(&mut self.tail);
            let payload = &mut tail[header.len..];
            if self.on_frame(&header, payload, &mut on_message)? == Flow::Stop {
                return Ok(());
            }
        }
        while let Some(rest) = buf.get_mut(pos..).filter(|rest| !rest.is_empty()) {
            let header = match parse_header(rest, self.client_role)? {
                Parsed::Frame(header) => header,
                Parsed::Need(_) => {
                    self.stash(rest, usize::MAX);
                    return Ok(());
                }
            };
            self.check(&header)?;
            let end = header.frame_len();
            let Some(frame) = rest.get_mut(..end) else {
                self.stash(rest, end);
                return Ok(());
            };
            let payload = &mut frame[header.len..];
            if self.on_frame(&header, payload, &mut on_message)? == Flow::Stop {
                return Ok(());
            }
            pos += end;
        }
        Ok(())
    }

    /// Changes the largest message accepted from now on (the pre-authentication cap is
    /// lifted once the connection authenticated).
    pub fn set_max_message_size(&mut self, max_message_size: usize) {
        self.max_message_size = max_message_size;
    }

    /// Heap bytes this decoder holds right now (0 when nothing is pending).
    pub fn buffered(&self) -> usize {
        self.tail.capacity() + self.frag.capacity()
    }

    /// Checks what depends on the decoder's state, before any payload byte is buffered.
    #[inline]
    fn check(&self, header: &Header) -> Result<(), CloseReason> {
        match header.opcode {
            OP_CONTINUATION if self.frag_opcode == OP_CONTINUATION => {
                return Err(protocol("continuation frame without a started message"));
            }
            OP_TEXT | OP_BINARY if self.frag_opcode != OP_CONTINUATION => {
                return Err(protocol(
                    "new data frame while a fragmented message is in progress",
                ));
            }
            _ => {}
        }
        let total = if header.opcode == OP_CONTINUATION {
            self.frag.len().saturating_add(header.payload)
        } else {
            header.payload
        };
        if total > self.max_message_size {
            return Err(CloseReason::TooBig);
        }
        Ok(())
    }

    /// Keeps the start of a frame that did not arrive whole (`limit`: its full size, if known).
    #[cold]
    fn stash(&mut self, bytes: &[u8], limit: usize) {
        self.grow_tail(bytes.len(), limit);
        self.tail.extend_from_slice(bytes);
    }

    /// Makes room for `more` tail bytes, doubling the capacity (so a slow sender of a
    /// large frame costs linear copying) but never past `limit`, the frame's size:
    /// memory follows the bytes received, not the length a header declares.
    fn grow_tail(&mut self, more: usize, limit: usize) {
        let needed = self.tail.len() + more;
        if needed > self.tail.capacity() {
            let doubled = (self.tail.capacity() * 2).max(64);
            let target = doubled.min(limit).max(needed);
            self.tail.reserve_exact(target - self.tail.len());
        }
    }

    /// Moves bytes from `buf` into the tail until it holds one whole frame.
    /// Returns that frame's header and the number of bytes taken from `buf`,
    /// or `None` when `buf` ran out first (all of it was taken).
    #[cold]
    fn fill_tail(&mut self, buf: &[u8]) -> Result<Option<(Header, usize)>, CloseReason> {
        let mut used = 0;
        loop {
            let (want, limit, header) = match parse_header(&self.tail, self.client_role)? {
                Parsed::Need(want) => (want, usize::MAX, None),
                Parsed::Frame(header) => {
                    self.check(&header)?;
                    (header.frame_len(), header.frame_len(), Some(header))
                }
            };
            let take = (want - self.tail.len()).min(buf.len() - used);
            self.grow_tail(take, limit);
            self.tail.extend_from_slice(&buf[used..used + take]);
            used += take;
            if self.tail.len() < want {
                return Ok(None);
            }
            if let Some(header) = header {
                return Ok(Some((header, used)));
            }
        }
    }

    /// Unmasks one complete frame's payload and delivers what it completes.
    #[inline]
    fn on_frame<F: FnMut(Message<'_>) -> Flow>(
        &mut self,
        header: &Header,
        payload: &mut [u8],
        on_message: &mut F,
    ) -> Result<Flow, CloseReason> {
        if let Some(mask) = header.mask {
            apply_mask(payload, mask);
        }
        let message = match header.opcode {
            OP_TEXT if header.fin => {
                Message::Text(std::str::from_utf8(payload).map_err(|_| CloseReason::InvalidUtf8)?)
            }
            OP_BINARY if header.fin => Message::Binary(payload),
            OP_PING => Message::Ping(payload),
            OP_PONG => Message::Pong(payload),
            OP_CLOSE => close_message(payload)?,
            _ => return self.on_fragment(header, payload, on_message),
        };
        Ok(on_message(message))
    }

    /// Appends a fragment (first one or continuation) and delivers the message at its end.
    #[cold]
    fn on_fragment<F: FnMut(Message<'_>) -> Flow>(
        &mut self,
        header: &Header,
        payload: &[u8],
        on_message: &mut F,
    ) -> Result<Flow, CloseReason> {
        if header.opcode != OP_CONTINUATION {
            self.frag_opcode = header.opcode;
        }
        self.frag.extend_from_slice(payload);
        if self.frag_opcode == OP_TEXT {
            self.check_utf8_prefix()?;
        }
        if !header.fin {
            return Ok(Flow::Continue);
        }
        // Taking the buffer out frees it once the message is delivered.
        let data = std::mem::take(&mut self.frag);
        let opcode = std::mem::replace(&mut self.frag_opcode, OP_CONTINUATION);
        self.frag_valid = 0;
        let message = if opcode == OP_TEXT {
            Message::Text(std::str::from_utf8(&data).map_err(|_| CloseReason::InvalidUtf8)?)
        } else {
            Message::Binary(&data)
        };
        Ok(on_message(message))
    }

    /// Fails as soon as the text received so far cannot be the start of valid UTF-8;
    /// a character cut at the end of a fragment may still be completed by the next one.
    fn check_utf8_prefix(&mut self) -> Result<(), CloseReason> {
        match std::str::from_utf8(&self.frag[self.frag_valid..]) {
            Ok(_) => self.frag_valid = self.frag.len(),
            Err(e) if e.error_len().is_none() => self.frag_valid += e.valid_up_to(),
            Err(_) => return Err(CloseReason::InvalidUtf8),
        }
        Ok(())
    }
}

/// The header of an unmasked server frame (FIN set) for `len` payload bytes:
/// the bytes, right-aligned in the array, and how many of them there are.
#[inline]
fn server_header(opcode: u8, len: usize) -> ([u8; MAX_HEADER], usize) {
    let mut h = [0u8; MAX_HEADER];
    let first = 0x80 | (opcode & 0x0F);
    let n = if len < 126 {
        h[9] = len as u8;
        2
    } else if let Ok(short) = u16::try_from(len) {
        h[7] = 126;
        h[8..10].copy_from_slice(&short.to_be_bytes());
        4
    } else {
        h[1] = 127;
        h[2..10].copy_from_slice(&(len as u64).to_be_bytes());
        10
    };
    h[MAX_HEADER - n] = first;
    (h, n)
}

/// Builds one server frame without copying its payload: the payload is written after
/// `MAX_HEADER` bytes of headroom and the header is put in front of it at `finish`.
pub struct FrameBuf {
    buf: Vec<u8>,
}

impl FrameBuf {
    /// A builder with room for `payload_hint` payload bytes.
    pub fn with_capacity(payload_hint: usize) -> Self {
        let mut buf = Vec::with_capacity(MAX_HEADER + payload_hint);
        buf.resize(MAX_HEADER, 0);
        FrameBuf { buf }
    }

    /// The payload written so far; append to it. The vector starts with `MAX_HEADER`
    /// bytes of headroom for the header: only append, never truncate or clear.
    pub fn payload(&mut self) -> &mut Vec<u8> {
        &mut self.buf
    }

    /// Payload bytes written so far (without the headroom).
    pub fn payload_len(&self) -> usize {
        self.buf.len().saturating_sub(MAX_HEADER)
    }

    /// The finished frame (FIN set, unmasked) with the given opcode.
    pub fn finish(self, opcode: u8) -> Bytes {
        let mut buf = self.buf;
        if buf.len() < MAX_HEADER {
            // The headroom was cut by misuse: restore it rather than fail.
            buf.resize(MAX_HEADER, 0);
        }
        let (header, n) = server_header(opcode, buf.len() - MAX_HEADER);
        let start = MAX_HEADER - n;
        buf[start..MAX_HEADER].copy_from_slice(&header[start..]);
        Bytes::from(buf).slice(start..)
    }
}

/// A complete unmasked server frame (FIN set).
pub fn frame(opcode: u8, payload: &[u8]) -> Bytes {
    let (header, n) = server_header(opcode, payload.len());
    let mut out = Vec::with_capacity(n + payload.len());
    out.extend_from_slice(&header[MAX_HEADER - n..]);
    out.extend_from_slice(payload);
    Bytes::from(out)
}

/// A close frame with a status code and a reason (truncated to fit 125 bytes on a char boundary).
pub fn close_frame(code: u16, reason: &str) -> Bytes {
    let mut end = reason.len().min(MAX_CONTROL_PAYLOAD - 2);
    while !reason.is_char_boundary(end) {
        end -= 1;
    }
    let mut payload = [0u8; MAX_CONTROL_PAYLOAD];
    payload[..2].copy_from_slice(&code.to_be_bytes());
    payload[2..2 + end].copy_from_slice(&reason.as_bytes()[..end]);
    frame(OP_CLOSE, &payload[..2 + end])
}

/// A masked client frame, as a client sends it (for tests, benches and load generators).
pub fn client_frame(fin: bool, opcode: u8, payload: &[u8], mask: [u8; 4]) -> Vec<u8> {
    let mut out = Vec::with_capacity(MAX_CLIENT_HEADER + payload.len());
    push_client_frame(&mut out, fin, opcode, payload, mask);
    out
}

/// Appends a masked client frame to `out`.
pub fn push_client_frame(out: &mut Vec<u8>, fin: bool, opcode: u8, payload: &[u8], mask: [u8; 4]) {
    out.push(if fin { 0x80 } else { 0 } | (opcode & 0x0F));
    let len = payload.len();
    if len < 126 {
        out.push(0x80 | len as u8);
    } else if let Ok(short) = u16::try_from(len) {
        out.push(0x80 | 126);
        out.extend_from_slice(&short.to_be_bytes());
    } else {
        out.push(0x80 | 127);
        out.extend_from_slice(&(len as u64).to_be_bytes());
    }
    out.extend_from_slice(&mask);
    let start = out.len();
    out.extend_from_slice(payload);
    apply_mask(&mut out[start..], mask);
}

#[cfg(test)]
mod tests {
    use super::*;

    const MASK: [u8; 4] = [0x37, 0xfa, 0x21, 0x3d];
    const MAX: usize = 1 << 20;

    use OwnedMessage as Owned;

    /// Feeds `bytes` in pieces cut at `cuts` (ascending offsets); returns what was
    /// delivered and the first error, if any.
    fn feed(
        d: &mut Decoder,
        bytes: &[u8],
        cuts: &[usize],
    ) -> (Vec<Owned>, Result<(), CloseReason>) {
        let mut out = Vec::new();
        let mut start = 0;
        for &end in cuts.iter().chain(std::iter::once(&bytes.len())) {
            let mut piece = bytes[start..end].to_vec();
            let result = d.decode(&mut piece, |m| {
                out.push(m.to_owned_message());
                Flow::Continue
            });
            if result.is_err() {
                return (out, result);
            }
            start = end;
        }
        (out, Ok(()))
    }

    fn decode_all(bytes: &[u8]) -> Result<Vec<Owned>, CloseReason> {
        let mut d = Decoder::new(MAX);
        let (out, result) = feed(&mut d, bytes, &[]);
        result.map(|()| out)
    }

    fn decode_err(bytes: &[u8]) -> CloseReason {
        decode_all(bytes).expect_err("the input must be rejected")
    }

    fn text(s: &str) -> Owned {
        Owned::Text(s.to_owned())
    }

    fn masked(opcode: u8, payload: &[u8]) -> Vec<u8> {
        client_frame(true, opcode, payload, MASK)
    }

    /// Several frames of every kind, fragments with an interleaved ping, extended lengths.
    fn mixed_stream() -> (Vec<u8>, Vec<Owned>) {
        let long: Vec<u8> = (0..300u32).map(|i| (i * 7) as u8).collect();
        let mut s = Vec::new();
        s.extend(masked(
            OP_TEXT,
            br#"{"event":"heartbeat","data":{"cpu":1}}"#,
        ));
        s.extend(client_frame(
            false,
            OP_TEXT,
            "h\u{e9}l".as_bytes(),
            [1, 2, 3, 4],
        ));
        s.extend(masked(OP_PING, b"p1"));
        s.extend(client_frame(false, OP_CONTINUATION, &[0xC3], [5, 6, 7, 8]));
        s.extend(client_frame(
            true,
            OP_CONTINUATION,
            &[0xA9, b'!'],
            [9, 9, 9, 9],
        ));
        s.extend(masked(OP_BINARY, &long));
        s.extend(masked(OP_PONG, b""));
        s.extend(masked(OP_TEXT, b""));
        s.extend(masked(OP_CLOSE, b"\x03\xe8bye"));
        let expected = vec![
            text(r#"{"event":"heartbeat","data":{"cpu":1}}"#),
            Owned::Ping(b"p1".to_vec()),
            text("h\u{e9}l\u{e9}!"),
            Owned::Binary(long),
            Owned::Pong(Vec::new()),
            text(""),
            Owned::Close(Some(1000), "bye".to_owned()),
        ];
        (s, expected)
    }

    #[test]
    fn close_reason_codes() {
        assert_eq!(CloseReason::Protocol("x").code(), 1002);
        assert_eq!(CloseReason::InvalidUtf8.code(), 1007);
        assert_eq!(CloseReason::TooBig.code(), 1009);
        assert_eq!(CloseReason::TooBig.to_string(), "message too big (1009)");
    }

    #[test]
    fn rfc_masked_hello() {
        // RFC 6455 §5.7: a single-frame masked text message.
        let bytes = [
            0x81, 0x85, 0x37, 0xfa, 0x21, 0x3d, 0x7f, 0x9f, 0x4d, 0x51, 0x58,
        ];
        assert_eq!(decode_all(&bytes), Ok(vec![text("Hello")]));
        // The same header with opcode pong.
        let pong = [
            0x8a, 0x85, 0x37, 0xfa, 0x21, 0x3d, 0x7f, 0x9f, 0x4d, 0x51, 0x58,
        ];
        assert_eq!(decode_all(&pong), Ok(vec![Owned::Pong(b"Hello".to_vec())]));
    }

    #[test]
    fn unmasks_in_place_without_copying() {
        let mut buf = masked(OP_TEXT, b"in place");
        let start = buf.as_ptr() as usize;
        let mut d = Decoder::new(MAX);
        let mut seen = None;
        d.decode(&mut buf, |m| {
            if let Message::Text(t) = m {
                seen = Some((t.as_ptr() as usize - start, t.len()));
            }
            Flow::Continue
        })
        .unwrap();
        assert_eq!(
            seen,
            Some((6, 8)),
            "the text must point into the input buffer"
        );
        assert_eq!(&buf[6..], b"in place");
        assert_eq!(d.buffered(), 0);
    }

    #[test]
    fn every_length_form() {
        for len in [0usize, 1, 7, 8, 9, 125, 126, 127, 65535, 65536, 70000] {
            let payload: Vec<u8> = (0..len).map(|i| (i % 251) as u8).collect();
            let bytes = masked(OP_BINARY, &payload);
            let (ext, len7) = match len {
                0..=125 => (0, len as u8),
                126..=65535 => (2, 126),
                _ => (8, 127),
            };
            assert_eq!(bytes.len(), 2 + ext + 4 + len);
            assert_eq!(&bytes[..2], &[0x82, 0x80 | len7]);
            match ext {
                2 => assert_eq!(bytes[2..4], (len as u16).to_be_bytes()),
                8 => assert_eq!(bytes[2..10], (len as u64).to_be_bytes()),
                _ => {}
            }
            assert_eq!(
                decode_all(&bytes),
                Ok(vec![Owned::Binary(payload.clone())]),
                "len {len}"
            );
            let ascii: Vec<u8> = payload.iter().map(|b| b'a' + b % 26).collect();
            let expected = text(std::str::from_utf8(&ascii).unwrap());
            assert_eq!(
                decode_all(&masked(OP_TEXT, &ascii)),
                Ok(vec![expected]),
                "len {len}"
            );
        }
    }

    #[test]
    fn byte_exact_extended_lengths() {
        // 126-form header for 256 bytes, with a zero mask (payload unchanged).
        let mut bytes = vec![0x82, 0xFE, 0x01, 0x00, 0, 0, 0, 0];
        bytes.extend(std::iter::repeat_n(0xAB, 256));
        assert_eq!(decode_all(&bytes), Ok(vec![Owned::Binary(vec![0xAB; 256])]));
        // 127-form header for 65536 bytes.
        let mut bytes = vec![0x82, 0xFF, 0, 0, 0, 0, 0, 1, 0, 0, 0, 0, 0, 0];
        bytes.extend(std::iter::repeat_n(0xCD, 65536));
        assert_eq!(
            decode_all(&bytes),
            Ok(vec![Owned::Binary(vec![0xCD; 65536])])
        );
    }

    #[test]
    fn apply_mask_matches_bytewise_xor() {
        for len in 0..40 {
            let original: Vec<u8> = (0..len as u8).collect();
            let mut fast = original.clone();
            apply_mask(&mut fast, MASK);
            let slow: Vec<u8> = original
                .iter()
                .enumerate()
                .map(|(i, b)| b ^ MASK[i % 4])
                .collect();
            assert_eq!(fast, slow, "len {len}");
        }
    }

    #[test]
    fn agrees_with_tungstenite_encoder() {
        use tungstenite::protocol::frame::{coding, Frame};
        let cases = [
            (
                coding::OpCode::Data(coding::Data::Text),
                "tungstenite \u{263a}".repeat(20),
            ),
            (
                coding::OpCode::Data(coding::Data::Binary),
                "x".repeat(70_000),
            ),
        ];
        for (opcode, payload) in cases {
            let mut frame = Frame::message(payload.clone().into_bytes(), opcode, true);
            frame.header_mut().mask = Some([0xde, 0xad, 0xbe, 0xef]);
            let mut bytes = Vec::new();
            frame.format(&mut bytes).unwrap();
            let expected = match opcode {
                coding::OpCode::Data(coding::Data::Text) => text(&payload),
                _ => Owned::Binary(payload.into_bytes()),
            };
            assert_eq!(decode_all(&bytes), Ok(vec![expected]));
        }
    }

    #[test]
    fn mixed_stream_in_one_call() {
        let (bytes, expected) = mixed_stream();
        assert_eq!(decode_all(&bytes), Ok(expected));
    }

    #[test]
    fn split_at_every_offset_gives_the_same_messages() {
        let (bytes, expected) = mixed_stream();
        for cut in 0..=bytes.len() {
            let mut d = Decoder::new(MAX);
            let (out, result) = feed(&mut d, &bytes, &[cut]);
            assert_eq!(result, Ok(()), "cut {cut}");
            assert_eq!(out, expected, "cut {cut}");
            assert_eq!(d.buffered(), 0, "cut {cut}");
        }
    }

    #[test]
    fn split_at_every_pair_of_offsets() {
        let (bytes, expected) = mixed_stream();
        let bytes = &bytes[..120]; // the first frames, headers and fragments included
        let expected_prefix = {
            let mut d = Decoder::new(MAX);
            feed(&mut d, bytes, &[]).0
        };
        assert!(
            expected_prefix.len() >= 3,
            "fragments and the interleaved ping are covered"
        );
        assert_eq!(expected_prefix[..], expected[..expected_prefix.len()]);
        for a in 0..=bytes.len() {
            for b in a..=bytes.len() {
                let mut d = Decoder::new(MAX);
                let (out, result) = feed(&mut d, bytes, &[a, b]);
                assert_eq!(
                    (out, result),
                    (expected_prefix.clone(), Ok(())),
                    "cuts {a} {b}"
                );
            }
        }
    }

    #[test]
    fn byte_by_byte_gives_the_same_messages() {
        let (bytes, expected) = mixed_stream();
        let cuts: Vec<usize> = (1..bytes.len()).collect();
        let mut d = Decoder::new(MAX);
        let (out, result) = feed(&mut d, &bytes, &cuts);
        assert_eq!(result, Ok(()));
        assert_eq!(out, expected);
        assert_eq!(d.buffered(), 0);
    }

    #[test]
    fn pseudo_random_chunks_give_the_same_messages() {
        let (bytes, expected) = mixed_stream();
        let mut seed = 0x2545_f491_u64;
        for _ in 0..200 {
            let mut cuts = Vec::new();
            let mut at = 0;
            loop {
                seed = seed
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                at += 1 + (seed >> 33) as usize % 40;
                if at >= bytes.len() {
                    break;
                }
                cuts.push(at);
            }
            let mut d = Decoder::new(MAX);
            assert_eq!(
                feed(&mut d, &bytes, &cuts),
                (expected.clone(), Ok(())),
                "cuts {cuts:?}"
            );
        }
    }

    #[test]
    fn large_frame_in_small_reads() {
        let payload: Vec<u8> = (0..65536u32).map(|i| (i % 253) as u8).collect();
        let bytes = masked(OP_BINARY, &payload);
        let cuts: Vec<usize> = (1..bytes.len() / 1000).map(|i| i * 1000).collect();
        let mut d = Decoder::new(MAX);
        assert_eq!(
            feed(&mut d, &bytes, &cuts),
            (vec![Owned::Binary(payload)], Ok(()))
        );
        assert_eq!(d.buffered(), 0);
    }

    #[test]
    fn buffered_tracks_tails_and_fragments() {
        let mut d = Decoder::new(MAX);
        let frame = masked(OP_TEXT, b"split me");
        let (out, result) = feed(&mut d, &frame[..5], &[]);
        assert_eq!((out.len(), result), (0, Ok(())));
        assert!(d.buffered() >= 5, "a header tail is kept");
        let (out, _) = feed(&mut d, &frame[5..], &[]);
        assert_eq!(out, vec![text("split me")]);
        assert_eq!(d.buffered(), 0);

        let (out, _) = feed(&mut d, &client_frame(false, OP_BINARY, b"abc", MASK), &[]);
        assert!(out.is_empty());
        assert!(d.buffered() >= 3, "a fragment in progress is kept");
        let (out, _) = feed(
            &mut d,
            &client_frame(true, OP_CONTINUATION, b"def", MASK),
            &[],
        );
        assert_eq!(out, vec![Owned::Binary(b"abcdef".to_vec())]);
        assert_eq!(d.buffered(), 0);
    }

    #[test]
    fn tail_memory_follows_received_bytes() {
        let payload = vec![0u8; 60_000];
        let bytes = masked(OP_BINARY, &payload);
        let mut d = Decoder::new(MAX);
        feed(&mut d, &bytes[..20], &[]).1.unwrap();
        assert!(
            d.buffered() < 1024,
            "a declared length must not reserve memory by itself"
        );
    }

    #[test]
    fn fragmented_message_with_interleaved_control_frames() {
        let mut s = Vec::new();
        s.extend(client_frame(false, OP_BINARY, b"ab", MASK));
        s.extend(masked(OP_PING, b"ping"));
        s.extend(client_frame(false, OP_CONTINUATION, b"cd", MASK));
        s.extend(masked(OP_PONG, b"pong"));
        s.extend(client_frame(false, OP_CONTINUATION, b"", MASK));
        s.extend(client_frame(true, OP_CONTINUATION, b"ef", MASK));
        s.extend(masked(OP_TEXT, b"next"));
        assert_eq!(
            decode_all(&s),
            Ok(vec![
                Owned::Ping(b"ping".to_vec()),
                Owned::Pong(b"pong".to_vec()),
                Owned::Binary(b"abcdef".to_vec()),
                text("next"),
            ])
        );
    }

    #[test]
    fn stop_discards_the_rest_of_the_buffer() {
        let mut s = masked(OP_TEXT, b"one");
        s.extend(masked(OP_TEXT, b"two"));
        s.extend(&masked(OP_TEXT, b"three")[..4]);
        let mut d = Decoder::new(MAX);
        let mut seen = Vec::new();
        d.decode(&mut s, |m| {
            seen.push(m.to_owned_message());
            Flow::Stop
        })
        .unwrap();
        assert_eq!(seen, vec![text("one")]);
        assert_eq!(d.buffered(), 0, "the discarded partial frame is not kept");
        assert_eq!(
            feed(&mut d, &masked(OP_TEXT, b"four"), &[]),
            (vec![text("four")], Ok(()))
        );
    }

    #[test]
    fn stop_on_a_frame_completed_from_the_tail() {
        let first = masked(OP_TEXT, b"first");
        let mut d = Decoder::new(MAX);
        feed(&mut d, &first[..3], &[]).1.unwrap();
        let mut rest = first[3..].to_vec();
        rest.extend(masked(OP_TEXT, b"second"));
        let mut seen = Vec::new();
        d.decode(&mut rest, |m| {
            seen.push(m.to_owned_message());
            Flow::Stop
        })
        .unwrap();
        assert_eq!(seen, vec![text("first")]);
        assert_eq!(d.buffered(), 0);
    }

    fn protocol_error(bytes: &[u8]) -> &'static str {
        match decode_err(bytes) {
            CloseReason::Protocol(why) => why,
            other => panic!("expected a protocol error, got {other:?}"),
        }
    }

    #[test]
    fn unmasked_client_frame_is_a_protocol_error() {
        // RFC 6455 §5.7: the unmasked "Hello" that only a server may send.
        let bytes = [0x81, 0x05, 0x48, 0x65, 0x6c, 0x6c, 0x6f];
        assert_eq!(protocol_error(&bytes), "unmasked client frame");
        assert_eq!(decode_err(&bytes).code(), 1002);
    }

    #[test]
    fn reserved_bits_are_protocol_errors() {
        for rsv in [0x40u8, 0x20, 0x10, 0x70] {
            let mut bytes = masked(OP_TEXT, b"x");
            bytes[0] |= rsv;
            assert_eq!(decode_err(&bytes).code(), 1002, "rsv {rsv:#x}");
        }
    }

    #[test]
    fn reserved_opcodes_are_protocol_errors() {
        for opcode in [3u8, 4, 5, 6, 7, 0xB, 0xC, 0xD, 0xE, 0xF] {
            assert_eq!(
                protocol_error(&masked(opcode, b"")),
                "reserved opcode",
                "{opcode:#x}"
            );
        }
    }

    #[test]
    fn bad_continuations_are_protocol_errors() {
        let stray = client_frame(true, OP_CONTINUATION, b"x", MASK);
        assert_eq!(
            protocol_error(&stray),
            "continuation frame without a started message"
        );

        let mut interleaved = client_frame(false, OP_TEXT, b"a", MASK);
        interleaved.extend(masked(OP_TEXT, b"b"));
        assert_eq!(
            protocol_error(&interleaved),
            "new data frame while a fragmented message is in progress"
        );
        let mut interleaved = client_frame(false, OP_BINARY, b"a", MASK);
        interleaved.extend(client_frame(false, OP_BINARY, b"b", MASK));
        assert_eq!(decode_err(&interleaved).code(), 1002);
    }

    #[test]
    fn bad_control_frames_are_protocol_errors() {
        for opcode in [OP_PING, OP_PONG, OP_CLOSE] {
            let fragmented = client_frame(false, opcode, b"", MASK);
            assert_eq!(protocol_error(&fragmented), "fragmented control frame");
            let long = masked(opcode, &[b'a'; 126]);
            assert_eq!(
                protocol_error(&long),
                "control frame payload over 125 bytes"
            );
        }
        assert_eq!(
            decode_all(&masked(OP_PING, &[7; 125])),
            Ok(vec![Owned::Ping(vec![7; 125])])
        );
    }

    #[test]
    fn top_bit_of_64_bit_length_is_a_protocol_error() {
        let bytes = [0x82, 0xFF, 0x80, 0, 0, 0, 0, 0, 0, 1, 1, 2, 3, 4];
        assert_eq!(
            protocol_error(&bytes),
            "64-bit payload length with the top bit set"
        );
    }

    #[test]
    fn close_payload_rules() {
        assert_eq!(
            decode_all(&masked(OP_CLOSE, b"")),
            Ok(vec![Owned::Close(None, String::new())])
        );
        assert_eq!(
            protocol_error(&masked(OP_CLOSE, b"\x03")),
            "close payload of 1 byte"
        );
        let valid = [
            1000u16, 1001, 1002, 1003, 1007, 1008, 1009, 1010, 1011, 1012, 1013, 1014, 3000, 3999,
            4000, 4999,
        ];
        for code in valid {
            let payload = [&code.to_be_bytes()[..], "r\u{e9}ason".as_bytes()].concat();
            let expected = Owned::Close(Some(code), "r\u{e9}ason".to_owned());
            assert_eq!(
                decode_all(&masked(OP_CLOSE, &payload)),
                Ok(vec![expected]),
                "{code}"
            );
        }
        let invalid = [
            0u16, 1, 999, 1004, 1005, 1006, 1015, 1016, 1100, 2000, 2999, 5000, 65535,
        ];
        for code in invalid {
            let bytes = masked(OP_CLOSE, &code.to_be_bytes());
            assert_eq!(protocol_error(&bytes), "invalid close code", "{code}");
        }
        let bad_reason = masked(OP_CLOSE, b"\x03\xe8\xff\xfe");
        assert_eq!(decode_err(&bad_reason), CloseReason::InvalidUtf8);
        assert_eq!(decode_err(&bad_reason).code(), 1007);
    }

    #[test]
    fn invalid_utf8_text_is_1007() {
        for bad in [
            &b"\xff"[..],
            b"ok\xc3",
            b"\xed\xa0\x80",
            b"\xc0\xaf",
            b"abc\x80def",
        ] {
            assert_eq!(
                decode_err(&masked(OP_TEXT, bad)),
                CloseReason::InvalidUtf8,
                "{bad:?}"
            );
        }
        // Invalid bytes in a binary message are fine.
        assert_eq!(
            decode_all(&masked(OP_BINARY, b"\xff")),
            Ok(vec![Owned::Binary(vec![0xff])])
        );
    }

    #[test]
    fn fragmented_utf8_fails_fast_and_completes_across_fragments() {
        // The first fragment is already invalid: rejected before the message ends.
        let bad_start = client_frame(false, OP_TEXT, b"ab\xff", MASK);
        assert_eq!(decode_err(&bad_start), CloseReason::InvalidUtf8);
        // A 4-byte character cut in three fragments is valid.
        let smile = "\u{1F600}".as_bytes();
        let mut s = client_frame(false, OP_TEXT, &smile[..1], MASK);
        s.extend(client_frame(false, OP_CONTINUATION, &smile[1..3], MASK));
        s.extend(client_frame(true, OP_CONTINUATION, &smile[3..], MASK));
        assert_eq!(decode_all(&s), Ok(vec![text("\u{1F600}")]));
        // A character still cut when the message ends is not.
        let mut s = client_frame(false, OP_TEXT, b"a", MASK);
        s.extend(client_frame(true, OP_CONTINUATION, &smile[..2], MASK));
        assert_eq!(decode_err(&s), CloseReason::InvalidUtf8);
        // A bad continuation byte is caught in the fragment that brings it.
        let mut s = client_frame(false, OP_TEXT, &smile[..1], MASK);
        s.extend(client_frame(false, OP_CONTINUATION, b"A", MASK));
        assert_eq!(decode_err(&s), CloseReason::InvalidUtf8);
    }

    #[test]
    fn too_big_is_decided_from_the_header() {
        let mut d = Decoder::new(100);
        let frame = masked(OP_BINARY, &[0; 101]);
        // Only the header has arrived: the declared length already exceeds the limit.
        let (_, result) = feed(&mut d, &frame[..8], &[]);
        assert_eq!(result, Err(CloseReason::TooBig));
        assert_eq!(CloseReason::TooBig.code(), 1009);

        let mut d = Decoder::new(100);
        assert_eq!(feed(&mut d, &masked(OP_TEXT, &[b'a'; 100]), &[]).1, Ok(()));

        // A huge 64-bit length (top bit clear) is too big, not a reason to allocate.
        let huge = [
            0x82, 0xFF, 0x7F, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 1, 2, 3, 4,
        ];
        let mut d = Decoder::new(100);
        assert_eq!(feed(&mut d, &huge, &[]).1, Err(CloseReason::TooBig));
    }

    #[test]
    fn too_big_header_completed_from_a_tail() {
        let frame = masked(OP_BINARY, &[0; 300]);
        for cut in 1..8 {
            let mut d = Decoder::new(200);
            assert_eq!(
                feed(&mut d, &frame[..8], &[cut]).1,
                Err(CloseReason::TooBig),
                "cut {cut}"
            );
        }
    }

    #[test]
    fn too_big_reassembled_message() {
        let mut s = client_frame(false, OP_TEXT, &[b'a'; 60], MASK);
        s.extend(masked(OP_PING, b""));
        s.extend(client_frame(false, OP_CONTINUATION, &[b'b'; 40], MASK));
        let exact = [&s[..], &client_frame(true, OP_CONTINUATION, b"", MASK)].concat();
        let over = [&s[..], &client_frame(true, OP_CONTINUATION, b"c", MASK)].concat();
        let mut d = Decoder::new(100);
        let (out, result) = feed(&mut d, &exact, &[]);
        assert_eq!(result, Ok(()));
        assert_eq!(out.len(), 2);
        let mut d = Decoder::new(100);
        // The last header alone, without its payload byte, says the message would exceed the limit.
        let cut = over.len() - 1;
        assert_eq!(feed(&mut d, &over[..cut], &[]).1, Err(CloseReason::TooBig));
    }

    #[test]
    fn errors_are_the_same_at_every_split() {
        // Each case: one valid message, then a frame that is rejected.
        let cases = [
            (
                [&masked(OP_TEXT, b"ok")[..], &[0x81, 0x02, b'n', b'o']].concat(),
                text("ok"),
                protocol("unmasked client frame"),
            ),
            (
                [&masked(OP_PING, b"p")[..], &masked(OP_TEXT, b"\xc3\x28")].concat(),
                Owned::Ping(b"p".to_vec()),
                CloseReason::InvalidUtf8,
            ),
            (
                [&masked(OP_TEXT, b"ok")[..], &masked(OP_CLOSE, b"\x03")].concat(),
                text("ok"),
                protocol("close payload of 1 byte"),
            ),
        ];
        for (bytes, first, error) in cases {
            for cut in 0..=bytes.len() {
                let mut d = Decoder::new(MAX);
                let delivered = feed(&mut d, &bytes, &[cut]);
                assert_eq!(delivered, (vec![first.clone()], Err(error)), "cut {cut}");
            }
        }
    }

    #[test]
    fn frame_buf_survives_a_cut_headroom() {
        let mut fb = FrameBuf::with_capacity(8);
        fb.payload().clear();
        assert_eq!(fb.payload_len(), 0);
        assert_eq!(&fb.finish(OP_PONG)[..], &[0x8A, 0x00]);
    }

    #[test]
    fn corrupted_streams_decode_the_same_at_any_split() {
        // Whatever the bytes, the outcome depends on them only, never on how reads cut them.
        let (clean, _) = mixed_stream();
        let mut seed = 0x9e37_79b9_u64;
        for at in 0..clean.len() {
            for flip in [0x01u8, 0x80, 0xFF] {
                let mut bytes = clean.clone();
                bytes[at] ^= flip;
                let whole = feed(&mut Decoder::new(300), &bytes, &[]);
                seed = seed.wrapping_mul(6364136223846793005).wrapping_add(1);
                let cut = (seed >> 33) as usize % (bytes.len() + 1);
                let split = feed(&mut Decoder::new(300), &bytes, &[cut]);
                assert_eq!(split, whole, "byte {at} ^ {flip:#x}, cut {cut}");
                if at % 16 == 0 {
                    let cuts: Vec<usize> = (1..bytes.len()).collect();
                    let bytewise = feed(&mut Decoder::new(300), &bytes, &cuts);
                    assert_eq!(bytewise, whole, "byte {at} ^ {flip:#x}, byte by byte");
                }
            }
        }
    }

    #[test]
    fn frame_buf_header_forms() {
        for (len, header) in [
            (0usize, vec![0x81, 0]),
            (125, vec![0x81, 125]),
            (126, vec![0x81, 126, 0, 126]),
            (65535, vec![0x81, 126, 0xFF, 0xFF]),
            (65536, vec![0x81, 127, 0, 0, 0, 0, 0, 1, 0, 0]),
        ] {
            let payload: Vec<u8> = (0..len).map(|i| b'a' + (i % 26) as u8).collect();
            let mut fb = FrameBuf::with_capacity(len);
            fb.payload().extend_from_slice(&payload);
            assert_eq!(fb.payload_len(), len);
            let out = fb.finish(OP_TEXT);
            assert_eq!(out.len(), header.len() + len, "len {len}");
            assert_eq!(&out[..header.len()], &header[..], "len {len}");
            assert_eq!(&out[header.len()..], &payload[..], "len {len}");
            assert_eq!(frame(OP_TEXT, &payload), out, "len {len}");
        }
    }

    #[test]
    fn frame_buf_does_not_copy_the_payload() {
        let mut fb = FrameBuf::with_capacity(5);
        fb.payload().extend_from_slice(b"Hello");
        let payload_at = fb.payload()[MAX_HEADER..].as_ptr() as usize;
        let out = fb.finish(OP_TEXT);
        assert_eq!(&out[..], &[0x81, 0x05, 0x48, 0x65, 0x6c, 0x6c, 0x6f]); // RFC 6455 §5.7
        assert_eq!(out[2..].as_ptr() as usize, payload_at);
    }

    #[test]
    fn server_frames_per_rfc_examples() {
        assert_eq!(
            &frame(OP_PING, b"Hello")[..],
            &[0x89, 0x05, 0x48, 0x65, 0x6c, 0x6c, 0x6f]
        );
        assert_eq!(&frame(OP_BINARY, &[0; 256])[..4], &[0x82, 0x7E, 0x01, 0x00]);
        assert_eq!(&frame(OP_PONG, b"")[..], &[0x8A, 0x00]);
    }

    #[test]
    fn close_frame_truncates_on_a_char_boundary() {
        assert_eq!(&close_frame(1000, "")[..], &[0x88, 0x02, 0x03, 0xE8]);
        assert_eq!(
            &close_frame(4001, "no")[..],
            &[0x88, 0x04, 0x0F, 0xA1, b'n', b'o']
        );
        let long = "\u{e9}".repeat(100); // 200 bytes of 2-byte characters
        let out = close_frame(1009, &long);
        assert_eq!(out[1] as usize, out.len() - 2);
        let payload = &out[2..];
        assert_eq!(payload.len(), 124, "123 bytes would cut a character");
        assert_eq!(
            std::str::from_utf8(&payload[2..]).unwrap(),
            "\u{e9}".repeat(61)
        );
        let ascii = "x".repeat(200);
        assert_eq!(close_frame(1000, &ascii).len(), 2 + 125);
    }

    /// Decodes `bytes` in the client role, cut at every offset, and checks that every
    /// split gives the same result as one call.
    fn client_decode_all(bytes: &[u8]) -> Result<Vec<Owned>, CloseReason> {
        let whole = {
            let mut d = Decoder::new_client(MAX);
            let (out, result) = feed(&mut d, bytes, &[]);
            result.map(|()| out)
        };
        for cut in 1..bytes.len() {
            let mut d = Decoder::new_client(MAX);
            let (out, result) = feed(&mut d, bytes, &[cut]);
            assert_eq!(result.map(|()| out), whole, "split at {cut}");
        }
        whole
    }

    #[test]
    fn client_role_decodes_server_frames_of_every_length_form() {
        let mut s = Vec::new();
        let mut expected = Vec::new();
        for n in [0usize, 5, 125, 126, 300, 65_535, 65_536, 70_000] {
            let body = "y".repeat(n);
            s.extend_from_slice(&frame(OP_TEXT, body.as_bytes()));
            expected.push(text(&body));
        }
        s.extend_from_slice(&frame(OP_PING, b"p"));
        s.extend_from_slice(&close_frame(4009, "replaced"));
        expected.push(Owned::Ping(b"p".to_vec()));
        expected.push(Owned::Close(Some(4009), "replaced".to_owned()));
        let mut d = Decoder::new_client(MAX);
        let (out, result) = feed(&mut d, &s, &[1, 3, 200, 70_100]);
        assert_eq!(result, Ok(()));
        assert_eq!(out, expected);
        assert_eq!(d.buffered(), 0);
    }

    #[test]
    fn client_role_agrees_at_every_split() {
        let mut s = Vec::new();
        s.extend_from_slice(&frame(OP_TEXT, br#"{"event":"authenticated"}"#));
        let built = {
            let mut f = FrameBuf::with_capacity(8);
            f.payload().extend_from_slice("h\u{e9}llo".as_bytes());
            f.finish(OP_TEXT)
        };
        s.extend_from_slice(&built);
        s.extend_from_slice(&frame(OP_PONG, b"7"));
        assert_eq!(
            client_decode_all(&s),
            Ok(vec![
                text(r#"{"event":"authenticated"}"#),
                text("h\u{e9}llo"),
                Owned::Pong(b"7".to_vec()),
            ])
        );
    }

    #[test]
    fn client_role_reassembles_unmasked_fragments() {
        let mut s = vec![0x01, 0x02, b'a', b'b', 0x89, 0x00, 0x80, 0x01, b'c'];
        s.extend_from_slice(&frame(OP_BINARY, &[1, 2]));
        assert_eq!(
            client_decode_all(&s),
            Ok(vec![
                Owned::Ping(Vec::new()),
                text("abc"),
                Owned::Binary(vec![1, 2]),
            ])
        );
    }

    #[test]
    fn client_role_rejects_masked_frames_and_server_role_unmasked_ones() {
        let masked_frame = masked(OP_TEXT, b"hi");
        assert_eq!(
            client_decode_all(&masked_frame),
            Err(CloseReason::Protocol("masked server frame"))
        );
        let unmasked = frame(OP_TEXT, b"hi");
        assert_eq!(
            decode_err(&unmasked),
            CloseReason::Protocol("unmasked client frame")
        );
    }

    #[test]
    fn client_role_keeps_the_other_checks() {
        assert_eq!(
            client_decode_all(&[0xC1, 0x00]),
            Err(CloseReason::Protocol(
                "reserved bits set without a negotiated extension"
            ))
        );
        assert_eq!(
            client_decode_all(&[0x09, 0x00]),
            Err(CloseReason::Protocol("fragmented control frame"))
        );
        assert_eq!(
            client_decode_all(&[0x81, 0x02, 0xff, 0xfe]),
            Err(CloseReason::InvalidUtf8)
        );
        let mut d = Decoder::new_client(10);
        let big = frame(OP_TEXT, &[b'x'; 11]);
        assert_eq!(
            feed(&mut d, &big[..2], &[]).1,
            Err(CloseReason::TooBig),
            "decided from the header"
        );
    }

    #[test]
    fn server_close_frame_decodes_once_masked() {
        let out = close_frame(1001, "going away \u{263a}");
        let masked = client_frame(true, OP_CLOSE, &out[2..], MASK);
        assert_eq!(
            decode_all(&masked),
            Ok(vec![Owned::Close(
                Some(1001),
                "going away \u{263a}".to_owned()
            )])
        );
    }
}
