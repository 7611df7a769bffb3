//! A thin safe wrapper over libjpeg-turbo's TurboJPEG 3 API (`turbojpeg-sys`).
//!
//! The `turbojpeg` crate covers scaled decoding but not partial decoding (a cropping region), and
//! a centre crop throws away a third or more of a photo: decoding only the rows and iMCU columns
//! that the crop and its resampling filter read saves that much of the decode. This module is the
//! small part of the C API ferry needs, with its invariants checked here.

use std::ffi::CStr;

use turbojpeg_sys as sys;

/// What the header says.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Header {
    pub(crate) width: usize,
    pub(crate) height: usize,
    /// iMCU width in pixels (a cropping region's left edge is a multiple of it, scaled); 0 when
    /// the subsampling is unusual and partial decoding is not attempted.
    pub(crate) mcu_width: usize,
    /// CMYK or YCCK, which libjpeg-turbo cannot turn into RGB.
    pub(crate) cmyk: bool,
}

/// A rectangle of the scaled image: left, top, width, height.
pub(crate) type Region = (usize, usize, usize, usize);

pub(crate) struct Decompressor(sys::tjhandle);

// SAFETY: a TurboJPEG handle has no thread affinity; it is used by one thread at a time (`&mut`).
unsafe impl Send for Decompressor {}

impl Drop for Decompressor {
    fn drop(&mut self) {
        // SAFETY: the handle came from tj3Init and is destroyed once.
        unsafe { sys::tj3Destroy(self.0) }
    }
}

impl Decompressor {
    /// A decompressor that refuses progressive JPEGs with more than `scan_limit` scans.
    pub(crate) fn new(scan_limit: u32) -> Self {
        // SAFETY: tj3Init has no preconditions; a null result is checked.
        let handle = unsafe { sys::tj3Init(sys::TJINIT_TJINIT_DECOMPRESS as i32) };
        assert!(!handle.is_null(), "libjpeg-turbo failed to allocate a decompressor");
        let d = Self(handle);
        // SAFETY: valid handle; SCANLIMIT is a decompression parameter.
        let rc = unsafe { sys::tj3Set(d.0, sys::TJPARAM_TJPARAM_SCANLIMIT as i32, scan_limit as i32) };
        assert_eq!(rc, 0, "setting the scan limit failed");
        d
    }

    fn error(&self) -> String {
        // SAFETY: tj3GetErrorStr returns a NUL-terminated string owned by the handle.
        unsafe { CStr::from_ptr(sys::tj3GetErrorStr(self.0)) }.to_string_lossy().into_owned()
    }

    fn get(&self, param: sys::TJPARAM) -> i32 {
        // SAFETY: valid handle, a header-describing parameter.
        unsafe { sys::tj3Get(self.0, param as i32) }
    }

    /// Reads the header of `data`.
    pub(crate) fn header(&mut self, data: &[u8]) -> Result<Header, String> {
        // SAFETY: the pointer and length describe `data`, which outlives the call.
        let rc = unsafe { sys::tj3DecompressHeader(self.0, data.as_ptr(), data.len() as _) };
        if rc != 0 {
            return Err(self.error());
        }
        let subsamp = self.get(sys::TJPARAM_TJPARAM_SUBSAMP);
        let colorspace = self.get(sys::TJPARAM_TJPARAM_COLORSPACE);
        // libjpeg-turbo's tjMCUWidth, by TJSAMP (444, 422, 420, GRAY, 440, 411, 441); the table
        // itself is not exported by the static library.
        let mcu_width = [8, 16, 16, 8, 8, 32, 8].get(subsamp as usize).copied().unwrap_or(0);
        Ok(Header {
            width: self.get(sys::TJPARAM_TJPARAM_JPEGWIDTH).max(0) as usize,
            height: self.get(sys::TJPARAM_TJPARAM_JPEGHEIGHT).max(0) as usize,
            mcu_width,
            cmyk: colorspace == sys::TJCS_TJCS_CMYK as i32 || colorspace == sys::TJCS_TJCS_YCCK as i32,
        })
    }

    /// Decodes `region` of `data` scaled by `num/denom` into packed RGB in `out`. The header must
    /// have been read with [`Self::header`]; `region.0` must be a multiple of the scaled iMCU width.
    pub(crate) fn decode(
        &mut self,
        data: &[u8],
        (num, denom): (usize, usize),
        region: Region,
        out: &mut Vec<u8>,
    ) -> Result<(), String> {
        let (x, y, w, h) = region;
        let factor = sys::tjscalingfactor { num: num as i32, denom: denom as i32 };
        // SAFETY: valid handle; the factor is one of libjpeg-turbo's (checked by the call).
        if unsafe { sys::tj3SetScalingFactor(self.0, factor) } != 0 {
            return Err(self.error());
        }
        let crop = sys::tjregion { x: x as i32, y: y as i32, w: w as i32, h: h as i32 };
        // SAFETY: valid handle, header read; the region is validated by the call.
        if unsafe { sys::tj3SetCroppingRegion(self.0, crop) } != 0 {
            return Err(self.error());
        }
        out.clear();
        out.resize(w * h * 3, 0);
        // SAFETY: `out` holds `h` rows of `w * 3` bytes, exactly the cropped destination.
        let rc = unsafe {
            sys::tj3Decompress8(
                self.0,
                data.as_ptr(),
                data.len() as _,
                out.as_mut_ptr(),
                (w * 3) as i32,
                sys::TJPF_TJPF_RGB,
            )
        };
        if rc != 0 {
            return Err(self.error());
        }
        Ok(())
    }
}
