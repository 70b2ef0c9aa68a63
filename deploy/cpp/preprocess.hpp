// Image decoding and the test-time preprocessing of pytorch-classifier-ng, without libtorch.
//
// The same steps as utils/images.py (load_image: EXIF orientation, any mode to 8-bit RGB or L)
// and utils/preprocess_np.py (resize by resize mode, centre crop, normalise), written to give the
// same bytes as Pillow: resampling is Pillow's two-pass convolution (horizontal, then vertical)
// in 22-bit fixed point with the filter support scaled by the downscale factor (antialiasing),
// and nearest neighbour is Pillow's affine scale. tests/test_deploy.py compares the output with
// Python's byte for byte.
#pragma once

#include <cstdint>
#include <stdexcept>
#include <string>
#include <vector>

namespace pcng {

// An 8-bit image, interleaved: height x width x channels (1 = L, 3 = RGB).
struct Image {
    int width = 0;
    int height = 0;
    int channels = 0;
    std::vector<uint8_t> pixels;

    uint8_t* row(int y) { return pixels.data() + static_cast<size_t>(y) * width * channels; }
    const uint8_t* row(int y) const { return pixels.data() + static_cast<size_t>(y) * width * channels; }
};

// What a model expects (the "preprocess" object of the metadata export.py writes).
struct PreprocessSpec {
    int resize = 224;
    int crop = 224;
    int channels = 3;
    std::string resize_mode = "crop";      // crop | letterbox | squash
    std::string interpolation = "bilinear";  // bilinear | bicubic | nearest
    std::vector<float> mean;
    std::vector<float> std;
};

// A file that cannot be read or decoded (the image is skipped and reported, the rest go on).
struct DecodeError : std::runtime_error {
    using std::runtime_error::runtime_error;
};

// Decode an image file to 8-bit RGB (channels 3) or L (channels 1) as utils.images.load_image
// does: EXIF orientation applied (JPEG APP1, PNG eXIf), alpha composited onto white, 16-bit
// grey scaled by 1/257, RGB -> L by ITU-R 601-2 luma in Pillow's fixed point.
Image load_image(const std::string& path, int channels);

// Pillow's Image.resize(size, resample) with no box and no reducing_gap.
Image resize(const Image& in, int width, int height, const std::string& interpolation);

// (width, height) after the resize step of a resize mode (torchvision's rules, see
// utils/preprocess_np.py resized_size).
void resized_size(int width, int height, const std::string& mode, int size, int* out_width, int* out_height);

// Resize by the spec's mode, centre crop: uint8 channels x crop x crop (planar, as the model takes it).
std::vector<uint8_t> preprocess(const Image& image, const PreprocessSpec& spec);

// uint8 planar C x H x W -> float32 (pixel - 255 mean) / (255 std), the same float32 steps as Python.
void normalize(const std::vector<uint8_t>& planar, const PreprocessSpec& spec, float* out);

}  // namespace pcng
