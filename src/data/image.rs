//! Image decoding to 8-bit RGB with a pixel limit checked from the header before decoding.
//!
//! - Grayscale is replicated to RGB; palette images are expanded.
//! - Alpha (RGBA, gray + alpha, palette with transparency) is composited over WHITE:
//!   `c' = round((c * a + 255 * (255 - a)) / 255)` on 8-bit values.
//! - 16-bit samples are scaled to 8 bit with rounding, `round(v * 255 / 65535)` (the image
//!   crate's conversion; PIL's `I;16` to `L` truncates instead, `v >> 8`, at most 1 apart).
//! - JPEG: grayscale, RGB and CMYK (converted to RGB by the decoder).
//!
//! Only regular files are images: the file type is checked (symlinks followed) before the file is
//! opened, so a FIFO, a device, a socket or a directory is refused instead of blocking or being
//! read. The pixel count (`width * height`) is read from the file's header and compared with the
//! limit before any pixel is decoded; the decoder's own memory limit is also set from it.

use std::fs::{File, Metadata};
use std::io::{BufRead, BufReader, Cursor, Seek};
use std::path::{Path, PathBuf};

use image::{DynamicImage, ImageDecoder, ImageReader, Limits, RgbImage};

/// Default pixel limit: 40 megapixels (the competition holds PNGs of 20k x 30k).
pub const DEFAULT_MAX_PIXELS: u64 = 40_000_000;

/// Why an image could not be loaded; every variant names the file.
#[derive(Debug, thiserror::Error)]
pub enum ImageLoadError {
    #[error("image {path} does not exist")]
    Missing { path: PathBuf },
    #[error("image id `{id}` is refused: it {reason}; ids name files inside {}", data.display())]
    BadId {
        /// The id, control characters escaped.
        id: String,
        /// The dataset's `data/` folder.
        data: PathBuf,
        reason: String,
    },
    #[error("image {path} is {kind}, not a regular file")]
    NotAFile { path: PathBuf, kind: &'static str },
    #[error("cannot read image {path}: {source}")]
    Unreadable {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("image {path} is corrupt, truncated or not an image: {message}")]
    Corrupt { path: PathBuf, message: String },
    #[error(
        "image {path} is {width}x{height} = {} pixels, over the limit of {limit} pixels \
         (raise it with --max-pixels to load it)",
        *width as u64 * *height as u64
    )]
    TooLarge {
        path: PathBuf,
        width: u32,
        height: u32,
        limit: u64,
    },
}

impl ImageLoadError {
    /// The file the error is about (for a refused id, the `data/` folder it must stay in).
    pub fn path(&self) -> &Path {
        match self {
            ImageLoadError::BadId { data, .. } => data,
            ImageLoadError::Missing { path }
            | ImageLoadError::NotAFile { path, .. }
            | ImageLoadError::Unreadable { path, .. }
            | ImageLoadError::Corrupt { path, .. }
            | ImageLoadError::TooLarge { path, .. } => path,
        }
    }
}

/// Opens `path` for reading if it is a regular file (symlinks followed). The type is checked
/// before opening, so that a FIFO or a device is never opened; the file is opened non-blocking
/// and its type checked again, so one swapped in between cannot block either (reads of a regular
/// file ignore the flag).
fn open_regular_file(path: &Path) -> Result<File, ImageLoadError> {
    let io_error = |source: std::io::Error| match source.kind() {
        std::io::ErrorKind::NotFound => ImageLoadError::Missing {
            path: path.to_path_buf(),
        },
        _ => ImageLoadError::Unreadable {
            path: path.to_path_buf(),
            source,
        },
    };
    check_regular(path, &std::fs::metadata(path).map_err(io_error)?)?;
    let mut options = std::fs::OpenOptions::new();
    options.read(true);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::custom_flags(&mut options, libc::O_NONBLOCK);
    let file = options.open(path).map_err(io_error)?;
    check_regular(path, &file.metadata().map_err(io_error)?)?;
    Ok(file)
}

/// `NotAFile` unless `metadata` is that of a regular file.
fn check_regular(path: &Path, metadata: &Metadata) -> Result<(), ImageLoadError> {
    let file_type = metadata.file_type();
    if file_type.is_file() {
        return Ok(());
    }
    let kind = if file_type.is_dir() {
        "a directory"
    } else {
        special_file_kind(&file_type)
    };
    Err(ImageLoadError::NotAFile {
        path: path.to_path_buf(),
        kind,
    })
}

#[cfg(unix)]
fn special_file_kind(file_type: &std::fs::FileType) -> &'static str {
    use std::os::unix::fs::FileTypeExt;
    if file_type.is_fifo() {
        "a FIFO (named pipe)"
    } else if file_type.is_socket() {
        "a socket"
    } else if file_type.is_char_device() {
        "a character device"
    } else if file_type.is_block_device() {
        "a block device"
    } else {
        "a special file"
    }
}

#[cfg(not(unix))]
fn special_file_kind(_: &std::fs::FileType) -> &'static str {
    "a special file"
}

/// Opens `path` and reads its header: a decoder ready to decode, after checking that
/// `width * height <= max_pixels`.
fn open_checked(path: &Path, max_pixels: u64) -> Result<impl ImageDecoder + use<>, ImageLoadError> {
    decoder_checked(BufReader::new(open_regular_file(path)?), path, max_pixels)
}

/// A decoder over `reader` (the image called `path` in errors) after checking from its header
/// that `width * height <= max_pixels`.
fn decoder_checked<'a, R: BufRead + Seek + 'a>(
    reader: R,
    path: &Path,
    max_pixels: u64,
) -> Result<impl ImageDecoder + use<'a, R>, ImageLoadError> {
    let corrupt = |e: image::ImageError| corrupt(path, e);
    let mut reader = ImageReader::new(reader)
        .with_guessed_format()
        .map_err(|source| ImageLoadError::Unreadable {
            path: path.to_path_buf(),
            source,
        })?;
    if reader.format().is_none() {
        return Err(ImageLoadError::Corrupt {
            path: path.to_path_buf(),
            message: "the file does not start like any supported image format".into(),
        });
    }
    // Read the header without limits so an oversized image is reported as TooLarge (with its
    // size) rather than as a decoder limit error.
    reader.limits(Limits::no_limits());
    let mut decoder = reader.into_decoder().map_err(corrupt)?;
    let (width, height) = decoder.dimensions();
    if width as u64 * height as u64 > max_pixels {
        return Err(ImageLoadError::TooLarge {
            path: path.to_path_buf(),
            width,
            height,
            limit: max_pixels,
        });
    }
    let mut limits = Limits::default();
    // Worst case output is 16-bit RGBA (8 bytes per pixel), plus room for the decoder's buffers.
    limits.max_alloc = Some(max_pixels.saturating_mul(8).saturating_add(64 << 20));
    decoder.set_limits(limits).map_err(corrupt)?;
    Ok(decoder)
}

/// `Corrupt` with the decoder's message on one trimmed line: the JPEG decoder ends some messages
/// with a newline and quotes others with an escaped one (`"...length:0\n"`).
fn corrupt(path: &Path, error: image::ImageError) -> ImageLoadError {
    let message = error.to_string().replace("\\n\"", "\"").replace("\\n", " ");
    ImageLoadError::Corrupt {
        path: path.to_path_buf(),
        message: message.split_whitespace().collect::<Vec<_>>().join(" "),
    }
}

/// Reads only the header: `(width, height)`, checked against `max_pixels`. Cheap enough to run
/// over a whole dataset.
pub fn image_dimensions(path: &Path, max_pixels: u64) -> Result<(u32, u32), ImageLoadError> {
    open_checked(path, max_pixels).map(|d| d.dimensions())
}

/// Loads `path` as 8-bit RGB (see the module docs for the conversions), refusing images with
/// more than `max_pixels` pixels before decoding them.
pub fn load_rgb(path: &Path, max_pixels: u64) -> Result<RgbImage, ImageLoadError> {
    decode(open_checked(path, max_pixels)?, path)
}

/// [`load_rgb`] on an image file's bytes already in memory (an upload); `name` stands for the
/// file in errors.
pub fn decode_rgb(bytes: &[u8], name: &Path, max_pixels: u64) -> Result<RgbImage, ImageLoadError> {
    decode(decoder_checked(Cursor::new(bytes), name, max_pixels)?, name)
}

fn decode(decoder: impl ImageDecoder, path: &Path) -> Result<RgbImage, ImageLoadError> {
    let image = DynamicImage::from_decoder(decoder).map_err(|e| corrupt(path, e))?;
    Ok(to_rgb_over_white(image))
}

/// Drops alpha by compositing over white; converts everything else to 8-bit RGB.
fn to_rgb_over_white(image: DynamicImage) -> RgbImage {
    if !image.color().has_alpha() {
        return image.into_rgb8();
    }
    let rgba = image.into_rgba8();
    let (width, height) = rgba.dimensions();
    let mut rgb = RgbImage::new(width, height);
    for (out, px) in rgb.pixels_mut().zip(rgba.pixels()) {
        let a = px[3] as u32;
        for c in 0..3 {
            out[c] = ((px[c] as u32 * a + 255 * (255 - a) + 127) / 255) as u8;
        }
    }
    rgb
}

#[cfg(test)]
mod tests {
    use super::*;
    use image::{Rgba, RgbaImage};

    #[test]
    fn bytes_decode_as_the_file_does_with_the_same_checks() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("a.png");
        RgbaImage::from_fn(5, 4, |x, y| Rgba([x as u8 * 50, y as u8 * 60, 7, 200]))
            .save(&path)
            .unwrap();
        let bytes = std::fs::read(&path).unwrap();
        let name = Path::new("upload");
        assert_eq!(
            decode_rgb(&bytes, name, 20).unwrap(),
            load_rgb(&path, 20).unwrap()
        );
        let err = decode_rgb(&bytes, name, 19).unwrap_err();
        assert!(matches!(err, ImageLoadError::TooLarge { .. }), "{err}");
        let err = decode_rgb(b"not an image", name, 20).unwrap_err();
        assert!(matches!(err, ImageLoadError::Corrupt { .. }) && err.path() == name);
    }

    #[test]
    fn alpha_is_composited_over_white() {
        let mut img = RgbaImage::new(3, 1);
        img.put_pixel(0, 0, Rgba([0, 0, 0, 0]));
        img.put_pixel(1, 0, Rgba([10, 20, 30, 255]));
        img.put_pixel(2, 0, Rgba([0, 100, 255, 128]));
        let rgb = to_rgb_over_white(DynamicImage::ImageRgba8(img));
        assert_eq!(rgb.get_pixel(0, 0).0, [255, 255, 255]);
        assert_eq!(rgb.get_pixel(1, 0).0, [10, 20, 30]);
        // 0*128/255 + 255*127/255 = 127; 100*128/255 + 127 = 177.2; 255
        assert_eq!(rgb.get_pixel(2, 0).0, [127, 177, 255]);
    }
}
