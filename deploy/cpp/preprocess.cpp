// Image decoding (stb_image) and Pillow-exact preprocessing; see preprocess.hpp.
#include "preprocess.hpp"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <fstream>
#include <iterator>

#define STB_IMAGE_IMPLEMENTATION
#define STBI_FAILURE_USERMSG
#include <stb/stb_image.h>

namespace pcng {
namespace {

// ------------------------------------------------------------------------------ decoding
uint16_t read16(const uint8_t* p, bool little) { return little ? p[0] | p[1] << 8 : p[0] << 8 | p[1]; }
uint32_t read32(const uint8_t* p, bool little) {
    return little ? p[0] | p[1] << 8 | p[2] << 16 | static_cast<uint32_t>(p[3]) << 24
                  : static_cast<uint32_t>(p[0]) << 24 | p[1] << 16 | p[2] << 8 | p[3];
}

// The Orientation tag (0x0112) of a TIFF-structured Exif block, 1 when absent or unreadable.
int tiff_orientation(const uint8_t* tiff, size_t size) {
    if (size < 8 || !((tiff[0] == 'I' && tiff[1] == 'I') || (tiff[0] == 'M' && tiff[1] == 'M'))) return 1;
    const bool little = tiff[0] == 'I';
    const uint32_t ifd = read32(tiff + 4, little);
    if (ifd + 2 > size) return 1;
    const uint16_t entries = read16(tiff + ifd, little);
    for (uint32_t i = 0; i < entries; ++i) {
        const size_t at = ifd + 2 + static_cast<size_t>(i) * 12;
        if (at + 12 > size) break;
        if (read16(tiff + at, little) == 0x0112 && read16(tiff + at + 2, little) == 3) {
            const int value = read16(tiff + at + 8, little);
            return value >= 1 && value <= 8 ? value : 1;
        }
    }
    return 1;
}

// EXIF orientation of a JPEG (APP1 "Exif") or PNG (eXIf chunk) file's bytes.
int exif_orientation(const std::vector<uint8_t>& data) {
    const size_t n = data.size();
    if (n > 4 && data[0] == 0xFF && data[1] == 0xD8) {  // JPEG: walk the marker segments up to the scan
        size_t at = 2;
        while (at + 4 <= n && data[at] == 0xFF) {
            const uint8_t marker = data[at + 1];
            const size_t length = data[at + 2] << 8 | data[at + 3];
            if (marker == 0xDA || length < 2) break;
            if (marker == 0xE1 && at + 4 + length - 2 <= n && length >= 8 && std::memcmp(&data[at + 4], "Exif\0\0", 6) == 0)
                return tiff_orientation(&data[at + 10], length - 8);
            at += 2 + length;
        }
    } else if (n > 8 && std::memcmp(data.data(), "\x89PNG\r\n\x1a\n", 8) == 0) {  // PNG: look for eXIf
        size_t at = 8;
        while (at + 12 <= n) {
            const size_t length = read32(&data[at], false);
            if (at + 12 + length > n) break;
            if (std::memcmp(&data[at + 4], "eXIf", 4) == 0) return tiff_orientation(&data[at + 8], length);
            at += 12 + length;
        }
    }
    return 1;
}

// Pillow's ImageOps.exif_transpose: the transpose each orientation value asks for.
Image apply_orientation(const Image& in, int orientation) {
    if (orientation <= 1) return in;
    const bool swap = orientation >= 5;
    Image out{swap ? in.height : in.width, swap ? in.width : in.height, in.channels, {}};
    out.pixels.resize(in.pixels.size());
    const int w = in.width, h = in.height, c = in.channels;
    for (int i = 0; i < out.height; ++i) {
        for (int j = 0; j < out.width; ++j) {
            int y = i, x = j;  // the source pixel of out[i][j]
            switch (orientation) {
                case 2: x = w - 1 - j; break;                    // mirror left-right
                case 3: y = h - 1 - i; x = w - 1 - j; break;     // rotate 180
                case 4: y = h - 1 - i; break;                    // mirror top-bottom
                case 5: y = j; x = i; break;                     // transpose
                case 6: y = h - 1 - j; x = i; break;             // rotate 270 (clockwise 90)
                case 7: y = h - 1 - j; x = w - 1 - i; break;     // transverse
                case 8: y = j; x = w - 1 - i; break;             // rotate 90 (counter-clockwise)
            }
            std::memcpy(out.row(i) + j * c, in.row(y) + x * c, c);
        }
    }
    return out;
}

// Pillow's RGB -> L: ITU-R 601-2 luma in 16-bit fixed point, rounded.
uint8_t luma(const uint8_t* rgb) { return static_cast<uint8_t>((rgb[0] * 19595 + rgb[1] * 38470 + rgb[2] * 7471 + 0x8000) >> 16); }

// Pillow's Image.alpha_composite of one pixel over opaque white (7 extra bits, divisions rounded).
uint8_t over_white(uint32_t value, uint32_t alpha) {
    constexpr uint32_t bits = 7;
    const uint32_t out_alpha255 = alpha * 255 + 255 * (255 - alpha);
    const uint32_t coef1 = alpha * 255 * 255 * (1u << bits) / out_alpha255;
    const uint32_t coef2 = 255 * (1u << bits) - coef1;
    const uint32_t tmp = value * coef1 + 255 * coef2 + (0x80u << bits);
    return static_cast<uint8_t>((((tmp >> 8) + tmp) >> 8) >> bits);
}

// Decoded pixels (1-4 interleaved 8-bit channels: L, LA, RGB, RGBA) -> RGB or L as utils.images.to_mode.
Image to_mode(const uint8_t* px, int width, int height, int comp, int channels) {
    Image out{width, height, channels, std::vector<uint8_t>(static_cast<size_t>(width) * height * channels)};
    for (size_t i = 0, n = static_cast<size_t>(width) * height; i < n; ++i) {
        const uint8_t* p = px + i * comp;
        uint8_t rgb[3] = {p[0], comp >= 3 ? p[1] : p[0], comp >= 3 ? p[2] : p[0]};
        if (comp == 2 || comp == 4) {  // transparent pixels have no colour: composite onto white
            const uint8_t alpha = p[comp - 1];
            for (uint8_t& v : rgb) v = alpha == 0 ? 255 : over_white(v, alpha);
        }
        if (channels == 3) {
            std::memcpy(&out.pixels[i * 3], rgb, 3);
        } else {
            out.pixels[i] = comp == 1 ? p[0] : luma(rgb);
        }
    }
    return out;
}

// ----------------------------------------------------------------------------- resampling
constexpr int kPrecisionBits = 32 - 8 - 2;  // Pillow's fixed point for 8-bit images

double bilinear_filter(double x) {
    if (x < 0.0) x = -x;
    return x < 1.0 ? 1.0 - x : 0.0;
}

double bicubic_filter(double x) {
    const double a = -0.5;
    if (x < 0.0) x = -x;
    if (x < 1.0) return ((a + 2.0) * x - (a + 3.0)) * x * x + 1;
    if (x < 2.0) return (((x - 5) * x + 8) * x - 4) * a;
    return 0.0;
}

// Per output pixel: the first input pixel, the count, and `ksize` fixed-point weights.
struct Coefficients {
    int ksize = 0;
    std::vector<int> first, count, weights;
};

Coefficients coefficients(int in_size, int out_size, double (*filter)(double), double support_base) {
    Coefficients c;
    const double scale = static_cast<double>(static_cast<float>(in_size)) / out_size;
    const double filterscale = scale < 1.0 ? 1.0 : scale;  // downscaling widens the filter: antialiasing
    const double support = support_base * filterscale;
    c.ksize = static_cast<int>(std::ceil(support)) * 2 + 1;
    c.first.resize(out_size);
    c.count.resize(out_size);
    c.weights.assign(static_cast<size_t>(out_size) * c.ksize, 0);
    std::vector<double> k(c.ksize);
    for (int xx = 0; xx < out_size; ++xx) {
        const double center = 0.0 + (xx + 0.5) * scale;
        const double ss = 1.0 / filterscale;
        const int xmin = std::max(0, static_cast<int>(center - support + 0.5));
        const int xmax = std::min(in_size, static_cast<int>(center + support + 0.5)) - xmin;
        double total = 0.0;
        for (int x = 0; x < xmax; ++x) {
            k[x] = filter((x + xmin - center + 0.5) * ss);
            total += k[x];
        }
        for (int x = 0; x < xmax; ++x) {
            const double w = total != 0.0 ? k[x] / total : k[x];
            c.weights[static_cast<size_t>(xx) * c.ksize + x] =
                static_cast<int>(w < 0 ? -0.5 + w * (1 << kPrecisionBits) : 0.5 + w * (1 << kPrecisionBits));
        }
        c.first[xx] = xmin;
        c.count[xx] = xmax;
    }
    return c;
}

uint8_t clip8(int sum) { return static_cast<uint8_t>(std::clamp(sum >> kPrecisionBits, 0, 255)); }

// Horizontal pass over input rows [row0, row0 + rows).
Image resample_horizontal(const Image& in, int out_width, int row0, int rows, const Coefficients& c) {
    Image out{out_width, rows, in.channels, std::vector<uint8_t>(static_cast<size_t>(out_width) * rows * in.channels)};
    for (int y = 0; y < rows; ++y) {
        const uint8_t* src = in.row(row0 + y);
        uint8_t* dst = out.row(y);
        for (int xx = 0; xx < out_width; ++xx) {
            const int* k = &c.weights[static_cast<size_t>(xx) * c.ksize];
            for (int ch = 0; ch < in.channels; ++ch) {
                int sum = 1 << (kPrecisionBits - 1);
                for (int x = 0; x < c.count[xx]; ++x) sum += src[(x + c.first[xx]) * in.channels + ch] * k[x];
                dst[xx * in.channels + ch] = clip8(sum);
            }
        }
    }
    return out;
}

// Vertical pass; input row r of the coefficients is in.row(r - row0).
Image resample_vertical(const Image& in, int out_height, int row0, const Coefficients& c) {
    Image out{in.width, out_height, in.channels, std::vector<uint8_t>(static_cast<size_t>(in.width) * out_height * in.channels)};
    const int values = in.width * in.channels;
    for (int yy = 0; yy < out_height; ++yy) {
        const int* k = &c.weights[static_cast<size_t>(yy) * c.ksize];
        uint8_t* dst = out.row(yy);
        for (int v = 0; v < values; ++v) {
            int sum = 1 << (kPrecisionBits - 1);
            for (int y = 0; y < c.count[yy]; ++y) sum += in.row(c.first[yy] - row0 + y)[v] * k[y];
            dst[v] = clip8(sum);
        }
    }
    return out;
}

// Pillow's nearest-neighbour resize: an affine scale sampling pixel centres, positions accumulated in double.
Image resize_nearest(const Image& in, int width, int height) {
    Image out{width, height, in.channels, std::vector<uint8_t>(static_cast<size_t>(width) * height * in.channels, 0)};
    const double ax = static_cast<double>(static_cast<float>(in.width)) / width;
    const double ay = static_cast<double>(static_cast<float>(in.height)) / height;
    std::vector<int> column(width, -1);
    double xo = ax * 0.5;
    for (int x = 0; x < width; ++x, xo += ax) {
        const int xin = xo < 0.0 ? -1 : static_cast<int>(xo);
        if (xin >= 0 && xin < in.width) column[x] = xin;
    }
    double yo = ay * 0.5;
    for (int y = 0; y < height; ++y, yo += ay) {
        const int yin = yo < 0.0 ? -1 : static_cast<int>(yo);
        if (yin < 0 || yin >= in.height) continue;
        for (int x = 0; x < width; ++x) {
            if (column[x] >= 0) std::memcpy(out.row(y) + x * in.channels, in.row(yin) + column[x] * in.channels, in.channels);
        }
    }
    return out;
}

}  // namespace

Image load_image(const std::string& path, int channels) {
    std::ifstream file(path, std::ios::binary);
    if (!file) throw DecodeError("cannot open the file");
    std::vector<uint8_t> data((std::istreambuf_iterator<char>(file)), std::istreambuf_iterator<char>());
    if (data.empty()) throw DecodeError("empty file");
    const auto* bytes = data.data();
    const int size = static_cast<int>(data.size());
    int width = 0, height = 0, comp = 0;
    std::vector<uint8_t> px;
    if (stbi_is_16_bit_from_memory(bytes, size)) {
        stbi_us* wide = stbi_load_16_from_memory(bytes, size, &width, &height, &comp, 0);
        if (!wide) throw DecodeError(std::string("cannot decode (") + stbi_failure_reason() + ")");
        px.resize(static_cast<size_t>(width) * height * comp);
        for (size_t i = 0; i < px.size(); ++i)  // Pillow: 16-bit grey / 257, rounded; 16-bit colour: the high byte
            px[i] = comp == 1 ? static_cast<uint8_t>(std::nearbyint(wide[i] / 257.0)) : static_cast<uint8_t>(wide[i] >> 8);
        stbi_image_free(wide);
    } else {
        stbi_uc* narrow = stbi_load_from_memory(bytes, size, &width, &height, &comp, 0);
        if (!narrow) throw DecodeError(std::string("cannot decode (") + stbi_failure_reason() + ")");
        px.assign(narrow, narrow + static_cast<size_t>(width) * height * comp);
        stbi_image_free(narrow);
    }
    return apply_orientation(to_mode(px.data(), width, height, comp, channels), exif_orientation(data));
}

Image resize(const Image& in, int width, int height, const std::string& interpolation) {
    if (width == in.width && height == in.height) return in;
    if (interpolation == "nearest") return resize_nearest(in, width, height);
    double (*filter)(double) = bilinear_filter;
    double support = 1.0;
    if (interpolation == "bicubic") {
        filter = bicubic_filter;
        support = 2.0;
    } else if (interpolation != "bilinear") {
        throw std::invalid_argument("unknown interpolation '" + interpolation + "' (bilinear, bicubic or nearest)");
    }
    const Coefficients vertical = coefficients(in.height, height, filter, support);
    if (width == in.width) return resample_vertical(in, height, 0, vertical);
    const Coefficients horizontal = coefficients(in.width, width, filter, support);
    // Pillow 13 runs the vertical pass first when the height shrinks by more than twice the
    // width's shrinkage (fewer rows to resample horizontally); the order changes the rounding.
    if (height < in.height && in.height - height > 2 * (in.width - width)) {
        const Image tall = resample_vertical(in, height, 0, vertical);
        return resample_horizontal(tall, width, 0, height, horizontal);
    }
    // the input rows the vertical pass reads: only those are resampled horizontally
    const int row0 = vertical.first.front();
    const int row1 = vertical.first.back() + vertical.count.back();
    const Image wide = resample_horizontal(in, width, row0, row1 - row0, horizontal);
    return height == in.height ? wide : resample_vertical(wide, height, row0, vertical);
}

void resized_size(int width, int height, const std::string& mode, int size, int* out_width, int* out_height) {
    if (mode == "squash") {
        *out_width = *out_height = size;
    } else if (mode == "letterbox") {
        const double scale = static_cast<double>(size) / std::max(width, height);
        *out_width = std::max(1, static_cast<int>(std::nearbyint(width * scale)));  // Python's round(): half to even
        *out_height = std::max(1, static_cast<int>(std::nearbyint(height * scale)));
    } else if (mode == "crop") {
        const int shorter = std::min(width, height), longer = std::max(width, height);
        const int new_long = static_cast<int>(static_cast<double>(static_cast<long long>(size) * longer) / shorter);
        *out_width = width <= height ? size : new_long;
        *out_height = width <= height ? new_long : size;
    } else {
        throw std::invalid_argument("unknown resize mode '" + mode + "' (crop, letterbox or squash)");
    }
}

std::vector<uint8_t> preprocess(const Image& image, const PreprocessSpec& spec) {
    constexpr uint8_t kLetterboxFill = 114;  // utils.core.schema.LETTERBOX_FILL (tests/test_deploy.py compares them)
    int width = 0, height = 0;
    resized_size(image.width, image.height, spec.resize_mode, spec.resize, &width, &height);
    Image img = resize(image, width, height, spec.interpolation);
    if (spec.resize_mode == "letterbox") {  // pad to a centred square of grey
        Image canvas{spec.resize, spec.resize, img.channels,
                     std::vector<uint8_t>(static_cast<size_t>(spec.resize) * spec.resize * img.channels, kLetterboxFill)};
        const int top = (spec.resize - height) / 2, left = (spec.resize - width) / 2;
        for (int y = 0; y < height; ++y)
            std::memcpy(canvas.row(top + y) + left * img.channels, img.row(y), static_cast<size_t>(width) * img.channels);
        img = std::move(canvas);
    }
    // centre crop; a side smaller than the crop is padded with zeros around it (torchvision's CenterCrop)
    const int crop = spec.crop, c = img.channels;
    const int pad_top = std::max(0, crop - img.height) / 2, pad_left = std::max(0, crop - img.width) / 2;
    const int padded_h = std::max(img.height, crop), padded_w = std::max(img.width, crop);
    const int top = static_cast<int>(std::nearbyint((padded_h - crop) / 2.0));
    const int left = static_cast<int>(std::nearbyint((padded_w - crop) / 2.0));
    std::vector<uint8_t> planar(static_cast<size_t>(c) * crop * crop, 0);
    for (int y = 0; y < crop; ++y) {
        const int sy = y + top - pad_top;
        if (sy < 0 || sy >= img.height) continue;
        for (int x = 0; x < crop; ++x) {
            const int sx = x + left - pad_left;
            if (sx < 0 || sx >= img.width) continue;
            for (int ch = 0; ch < c; ++ch) planar[(static_cast<size_t>(ch) * crop + y) * crop + x] = img.row(sy)[sx * c + ch];
        }
    }
    return planar;
}

void normalize(const std::vector<uint8_t>& planar, const PreprocessSpec& spec, float* out) {
    const size_t plane = planar.size() / spec.channels;
    for (int ch = 0; ch < spec.channels; ++ch) {
        const float mean = spec.mean[ch] * 255.0f, std = spec.std[ch] * 255.0f;
        for (size_t i = 0; i < plane; ++i) out[ch * plane + i] = (static_cast<float>(planar[ch * plane + i]) - mean) / std;
    }
}

}  // namespace pcng
