//! The frame decoder fed arbitrary bytes in arbitrary splits: it never panics, and what it
//! delivers (messages, then at most one error) does not depend on how the bytes were split.
//! Streams are either raw bytes or client frames built from the input, so that valid,
//! fragmented and subtly broken frames are all reached.
#![no_main]

use arcgate::protocol::codec::{
    client_frame, CloseReason, Decoder, Flow, Message, OwnedMessage as Owned,
};
use libfuzzer_sys::arbitrary::{Result, Unstructured};
use libfuzzer_sys::fuzz_target;

const MAX_MESSAGE: usize = 4096;

/// A stream of frames: mostly well-formed, with room for every kind of mistake.
fn frames(u: &mut Unstructured<'_>, client_role: bool) -> Result<Vec<u8>> {
    let mut out = Vec::new();
    while !u.is_empty() && out.len() < 64 * 1024 {
        let kind: u8 = u.arbitrary()?;
        let fin = kind & 0x80 != 0;
        let opcode = kind & 0x0F;
        let len = usize::from(u.arbitrary::<u16>()?) % 600;
        let payload = u.bytes(len.min(u.len()))?;
        let mut frame = client_frame(fin, opcode, payload, u.arbitrary()?);
        if client_role {
            // Server frames are unmasked: drop the mask bit and key, unmask the payload.
            let head = frame.len() - payload.len();
            frame[1] &= 0x7F;
            frame.drain(head - 4..head);
            let start = frame.len() - payload.len();
            frame[start..].copy_from_slice(payload);
        }
        if kind & 0x70 != 0 && u.ratio(1, 8)? {
            frame[0] |= kind & 0x70; // reserved bits
        }
        if u.ratio(1, 16)? {
            let cut = u.choose_index(frame.len())?;
            frame.truncate(cut); // a frame cut short: the next one starts inside it
        }
        out.extend_from_slice(&frame);
    }
    Ok(out)
}

/// Decodes `stream` in the given chunks; the messages and the error, if any.
fn run(stream: &[u8], cuts: &[usize], client_role: bool) -> (Vec<Owned>, Option<CloseReason>) {
    let mut d = if client_role {
        Decoder::new_client(MAX_MESSAGE)
    } else {
        Decoder::new(MAX_MESSAGE)
    };
    let mut seen = Vec::new();
    let mut from = 0;
    for &to in cuts.iter().chain(std::iter::once(&stream.len())) {
        let mut chunk = stream[from..to].to_vec();
        from = to;
        let result = d.decode(&mut chunk, |m| {
            let close = matches!(m, Message::Close(..));
            seen.push(m.to_owned_message());
            if close {
                Flow::Stop
            } else {
                Flow::Continue
            }
        });
        if let Err(reason) = result {
            return (seen, Some(reason));
        }
        if matches!(seen.last(), Some(Owned::Close(..))) {
            break;
        }
        // Memory follows what arrived, not what a header declares.
        assert!(d.buffered() <= 2 * (MAX_MESSAGE + 64) + stream.len());
    }
    (seen, None)
}

fuzz_target!(|data: &[u8]| {
    let mut u = Unstructured::new(data);
    let Ok(mode) = u.arbitrary::<u8>() else {
        return;
    };
    let client_role = mode & 2 != 0;
    let Ok(n_cuts) = u.int_in_range(0..=16u8) else {
        return;
    };
    let mut cut_seeds = Vec::new();
    for _ in 0..n_cuts {
        cut_seeds.push(u.arbitrary::<u32>().unwrap_or(0));
    }
    let stream = if mode & 1 == 0 {
        u.take_rest().to_vec()
    } else {
        match frames(&mut u, client_role) {
            Ok(s) => s,
            Err(_) => return,
        }
    };
    let mut cuts: Vec<usize> = cut_seeds
        .iter()
        .map(|&s| s as usize % (stream.len() + 1))
        .collect();
    cuts.sort_unstable();
    let whole = run(&stream, &[], client_role);
    let split = run(&stream, &cuts, client_role);
    assert_eq!(whole, split, "cuts {cuts:?}");
    let bytewise: Vec<usize> = (1..stream.len().min(2048)).collect();
    if stream.len() <= 2048 {
        assert_eq!(whole, run(&stream, &bytewise, client_role), "byte by byte");
    }
});
