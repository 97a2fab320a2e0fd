//! RFC 6455 frames: in-place decoding of (masked) client frames, encoding of (unmasked) server frames.

use bytes::Bytes;

pub const OP_CONTINUATION: u8 = 0x0;
pub const OP_TEXT: u8 = 0x1;
pub const OP_BINARY: u8 = 0x2;
pub const OP_CLOSE: u8 = 0x8;
pub const OP_PING: u8 = 0x9;
pub const OP_PONG: u8 = 0xA;

/// Largest server frame header: 2 bytes + 8 bytes of extended length (server frames carry no mask).
pub const MAX_HEADER: usize = 10;

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
        unimplemented!()
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

/// Whether the decoder should go on with the rest of the buffer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Flow {
    Continue,
    Stop,
}

/// Incremental decoder of one connection's client frames.
///
/// Holds no heap memory while idle: bytes are kept only when a frame is split across
/// reads (the tail) or a fragmented message is being reassembled.
#[derive(Debug)]
pub struct Decoder {}

impl Decoder {
    pub fn new(max_message_size: usize) -> Self {
        let _ = max_message_size;
        unimplemented!()
    }

    /// Decodes every complete message in `buf`, unmasking in place, and calls `on_message`
    /// for each in order. Bytes of an incomplete frame are kept for the next call.
    /// Returning `Flow::Stop` from `on_message` discards the rest of `buf`.
    /// An `Err` means: send a close frame with `reason.code()` and close.
    pub fn decode(
        &mut self,
        buf: &mut [u8],
        on_message: impl FnMut(Message<'_>) -> Flow,
    ) -> Result<(), CloseReason> {
        let _ = (buf, on_message);
        unimplemented!()
    }

    /// Heap bytes this decoder holds right now (0 when nothing is pending).
    pub fn buffered(&self) -> usize {
        unimplemented!()
    }
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

    /// The payload written so far; append to it.
    pub fn payload(&mut self) -> &mut Vec<u8> {
        &mut self.buf
    }

    /// The finished frame (FIN set, unmasked) with the given opcode.
    pub fn finish(self, opcode: u8) -> Bytes {
        let mut buf = self.buf;
        let len = buf.len() - MAX_HEADER;
        let start = if len < 126 {
            buf[MAX_HEADER - 1] = len as u8;
            MAX_HEADER - 2
        } else if len <= u16::MAX as usize {
            buf[MAX_HEADER - 3] = 126;
            buf[MAX_HEADER - 2..MAX_HEADER].copy_from_slice(&(len as u16).to_be_bytes());
            MAX_HEADER - 4
        } else {
            buf[1] = 127;
            buf[2..MAX_HEADER].copy_from_slice(&(len as u64).to_be_bytes());
            0
        };
        buf[start] = 0x80 | opcode;
        Bytes::from(buf).slice(start..)
    }
}

/// A complete unmasked server frame (FIN set).
pub fn frame(opcode: u8, payload: &[u8]) -> Bytes {
    let _ = (opcode, payload);
    unimplemented!()
}

/// A close frame with a status code and a reason (truncated to fit 125 bytes on a char boundary).
pub fn close_frame(code: u16, reason: &str) -> Bytes {
    let _ = (code, reason);
    unimplemented!()
}
