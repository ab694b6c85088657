//! DivX-style packed B-frames, unpacked before decoding.
//!
//! DivX 5 and some Xvid builds store a B-VOP in the same AVI chunk as the P-VOP before it,
//! followed by a placeholder chunk (a not-coded VOP). FFmpeg's MPEG-4 decoder unpacks such
//! a stream only when its user data carries DivX's marker (`DivX503b1393p`); without the
//! marker it decodes the first VOP of each chunk, skips the placeholders, and loses every
//! packed B-frame without an error (35 of 60 frames in the test). FFmpeg's
//! `mpeg4_unpack_bframes` bitstream filter finds a second VOP in a packet by its start code,
//! marker or not, and moves it into the placeholder's packet, which is what the decoder's
//! own unpacking does; on a stream that is not packed it passes every packet through. So
//! every MPEG-4 Part 2 stream goes through it.

use ffmpeg::ffi;
use ffmpeg::packet::Mut;
use ffmpeg_next as ffmpeg;

/// An initialised `mpeg4_unpack_bframes` filter.
pub(crate) struct Unpacker {
    ctx: *mut ffi::AVBSFContext,
}

impl Unpacker {
    /// A filter for a stream with these codec parameters and time base.
    #[allow(unsafe_code)]
    pub(crate) fn new(
        params: &ffmpeg::codec::Parameters,
        time_base: ffmpeg::Rational,
    ) -> Result<Unpacker, String> {
        // SAFETY: FFmpeg's documented sequence: look the filter up, allocate its context
        // (freed by `Drop`, also when a later step fails), copy the stream's parameters in,
        // set the input time base, initialise. Every pointer is checked or owned here.
        unsafe {
            let filter = ffi::av_bsf_get_by_name(c"mpeg4_unpack_bframes".as_ptr());
            if filter.is_null() {
                return Err("this FFmpeg has no mpeg4_unpack_bframes filter".into());
            }
            let mut ctx = std::ptr::null_mut();
            check(ffi::av_bsf_alloc(filter, &mut ctx), "allocating")?;
            let unpacker = Unpacker { ctx };
            check(
                ffi::avcodec_parameters_copy((*ctx).par_in, params.as_ptr()),
                "copying the stream parameters",
            )?;
            (*ctx).time_base_in = time_base.into();
            check(ffi::av_bsf_init(ctx), "initialising")?;
            Ok(unpacker)
        }
    }

    /// The packets `packet` becomes: itself (most), its first VOP (a packed pair, whose
    /// B-VOP is held), the held B-VOP (in a placeholder's place), or none.
    #[allow(unsafe_code)]
    pub(crate) fn filter(
        &mut self,
        mut packet: ffmpeg::Packet,
    ) -> Result<Vec<ffmpeg::Packet>, String> {
        let mut out = Vec::with_capacity(1);
        // SAFETY: `packet` is a live packet whose contents the filter takes over (the
        // `Packet` is left empty and unreferenced on drop); every output packet is a fresh
        // `Packet` the filter moves its contents into.
        unsafe {
            check(
                ffi::av_bsf_send_packet(self.ctx, packet.as_mut_ptr()),
                "sending a packet",
            )?;
            loop {
                let mut p = ffmpeg::Packet::empty();
                let r = ffi::av_bsf_receive_packet(self.ctx, p.as_mut_ptr());
                if r == ffi::AVERROR(ffi::EAGAIN) || r == ffi::AVERROR_EOF {
                    break;
                }
                check(r, "receiving a packet")?;
                out.push(p);
            }
        }
        Ok(out)
    }
}

impl Drop for Unpacker {
    #[allow(unsafe_code)]
    fn drop(&mut self) {
        // SAFETY: `ctx` came from `av_bsf_alloc` and is freed once, here.
        unsafe { ffi::av_bsf_free(&mut self.ctx) }
    }
}

fn check(r: std::os::raw::c_int, what: &str) -> Result<(), String> {
    if r < 0 {
        Err(format!(
            "unpacking packed B-frames ({what}): {}",
            ffmpeg::Error::from(r)
        ))
    } else {
        Ok(())
    }
}
