// classify: run a TorchScript model exported by pytorch-classifier-ng's export.py on images, with
// libtorch and no Python.
//
//   classify MODEL IMAGE... [--meta FILE] [--batch N] [--threads N] [--all]
//   classify --preprocess-only --meta FILE --dump-input OUT IMAGE...
//
// Prints one `path,class,probability` line per image (CSV; with --all, every class's probability
// follows in the model's class order). The preprocessing (size, resize mode, interpolation,
// channels, mean, std), the class names and the calibration temperature (the logits are divided by
// it before the softmax) come from the JSON export.py writes beside the model (MODEL.json), else
// from the meta.json inside the TorchScript file. An image that cannot be read
// is reported on stderr and skipped; the exit code is then 1. A usage error or an unusable model is
// one `error: ...` line on stderr and exit code 2. The throughput (decoding, preprocessing and
// inference, after the model has loaded) goes to stderr.
#include <ATen/Parallel.h>
#include <torch/script.h>

#include <nlohmann/json.hpp>

#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <fstream>
#include <iostream>
#include <sstream>
#include <string>
#include <vector>

#include "preprocess.hpp"

namespace {

using nlohmann::json;

struct UsageError : std::runtime_error {
    using std::runtime_error::runtime_error;
};

const char* kUsage =
    "usage: classify MODEL IMAGE... [--meta FILE] [--batch N] [--threads N] [--all]\n"
    "       classify --preprocess-only --meta FILE --dump-input OUT IMAGE...\n"
    "MODEL is a TorchScript file written by export.py (best.torchscript); its metadata is MODEL.json\n"
    "beside it (or --meta FILE, or the meta.json inside the file). Prints path,class,probability per image.\n"
    "  --all              append every class's probability to each line\n"
    "  --batch N          images per forward pass (default 32; a fixed-batch export uses its own)\n"
    "  --threads N        compute threads (default: libtorch's, OMP_NUM_THREADS)\n"
    "  --dump-input OUT   also write each image's preprocessed uint8 C x H x W bytes to OUT (for checks)\n"
    "  --preprocess-only  no model: only decode and preprocess (needs --meta and --dump-input)\n";

struct Options {
    std::string model, meta, dump;
    std::vector<std::string> images;
    int batch = 32, threads = 0;
    bool all = false, preprocess_only = false;
};

int positive(const std::string& flag, const std::string& value) {
    try {
        size_t used = 0;
        const int n = std::stoi(value, &used);
        if (used == value.size() && n > 0) return n;
    } catch (const std::exception&) {
    }
    throw UsageError(flag + " must be a positive integer, not '" + value + "'");
}

Options parse_args(int argc, char** argv) {
    Options o;
    std::vector<std::string> positional;
    for (int i = 1; i < argc; ++i) {
        const std::string arg = argv[i];
        auto value = [&]() -> std::string {
            if (i + 1 >= argc) throw UsageError(arg + " needs a value");
            return argv[++i];
        };
        if (arg == "-h" || arg == "--help") {
            std::cout << kUsage;
            std::exit(0);
        } else if (arg == "--meta") {
            o.meta = value();
        } else if (arg == "--dump-input") {
            o.dump = value();
        } else if (arg == "--batch") {
            o.batch = positive(arg, value());
        } else if (arg == "--threads") {
            o.threads = positive(arg, value());
        } else if (arg == "--all") {
            o.all = true;
        } else if (arg == "--preprocess-only") {
            o.preprocess_only = true;
        } else if (arg.rfind("--", 0) == 0) {
            throw UsageError("unknown option " + arg + " (see classify --help)");
        } else {
            positional.push_back(arg);
        }
    }
    if (!o.preprocess_only) {
        if (positional.empty()) throw UsageError("no model given (see classify --help)");
        o.model = positional.front();
        positional.erase(positional.begin());
    } else if (o.meta.empty() || o.dump.empty()) {
        throw UsageError("--preprocess-only needs --meta FILE and --dump-input OUT");
    }
    if (positional.empty()) throw UsageError("no image given (see classify --help)");
    o.images = positional;
    return o;
}

// ------------------------------------------------------------------------------ metadata
struct Meta {
    pcng::PreprocessSpec spec;
    std::vector<std::string> class_names;
    std::vector<float> temperature;  // the logits are divided by it before the softmax (one value); empty = 1
    int fixed_batch = 0;  // > 0: the model takes exactly this many images per call
    bool half = false;
};

json read_json(const std::string& text, const std::string& where) {
    try {
        return json::parse(text);
    } catch (const json::exception& err) {
        throw UsageError(where + ": the model metadata is not valid JSON (" + err.what() + ")");
    }
}

Meta parse_meta(const json& info, const std::string& where) {
    Meta m;
    try {
        const json& p = info.at("preprocess");
        m.spec.resize = p.at("resize").get<int>();
        m.spec.crop = p.at("crop").get<int>();
        m.spec.channels = p.at("channels").get<int>();
        m.spec.resize_mode = p.value("resize_mode", std::string("crop"));
        m.spec.interpolation = p.value("interpolation", std::string("bilinear"));
        m.spec.mean = p.at("mean").get<std::vector<float>>();
        m.spec.std = p.at("std").get<std::vector<float>>();
        m.class_names = info.at("class_names").get<std::vector<std::string>>();
        if (info.contains("temperature") && !info["temperature"].is_null())  // calibration (metrice.py --task calibrate)
            m.temperature = info["temperature"].get<std::vector<float>>();
        if (info.contains("input") && info["input"].contains("shape") && info["input"]["shape"][0].is_number_integer() &&
            !info.value("dynamic", true))
            m.fixed_batch = info["input"]["shape"][0].get<int>();
        m.half = info.value("half", false) || info.value("precision", std::string()) == "fp16";
    } catch (const json::exception& err) {
        throw UsageError(where + ": not the metadata of an export.py model (" + err.what() + ")");
    }
    const auto c = static_cast<size_t>(m.spec.channels);
    if ((c != 1 && c != 3) || m.spec.mean.size() != c || m.spec.std.size() != c || m.spec.resize < 1 || m.spec.crop < 1 ||
        m.class_names.size() < 2)
        throw UsageError(where + ": inconsistent preprocessing or class names in the model metadata");
    if (m.temperature.size() > 1 || (m.temperature.size() == 1 && !(m.temperature[0] > 0.0f)))
        throw UsageError(where + ": the temperature must be one positive number (classify computes a softmax: a "
                         "multi-label model's one per class is not supported)");
    int w = 0, h = 0;
    try {
        pcng::resized_size(1, 1, m.spec.resize_mode, 1, &w, &h);
        pcng::resize(pcng::Image{1, 1, 1, {0}}, 2, 2, m.spec.interpolation);
    } catch (const std::invalid_argument& err) {
        throw UsageError(where + ": " + err.what());
    }
    return m;
}

std::string slurp(const std::string& path) {
    std::ifstream in(path, std::ios::binary);
    if (!in) return {};
    std::ostringstream text;
    text << in.rdbuf();
    return text.str();
}

// ----------------------------------------------------------------------------------- output
std::string csv_field(const std::string& text) {
    if (text.find_first_of(",\"\n\r") == std::string::npos) return text;
    std::string quoted = "\"";
    for (char ch : text) quoted += ch == '"' ? std::string("\"\"") : std::string(1, ch);
    return quoted + "\"";
}

void print_rows(const std::vector<std::string>& paths, const torch::Tensor& probs, const Meta& meta, bool all) {
    const auto p = probs.accessor<float, 2>();
    for (size_t i = 0; i < paths.size(); ++i) {
        int64_t best = 0;
        for (int64_t c = 1; c < probs.size(1); ++c) best = p[i][c] > p[i][best] ? c : best;
        std::printf("%s,%s,%.6f", csv_field(paths[i]).c_str(), csv_field(meta.class_names[best]).c_str(), p[i][best]);
        if (all)
            for (int64_t c = 0; c < probs.size(1); ++c) std::printf(",%.6f", p[i][c]);
        std::printf("\n");
    }
}

// ------------------------------------------------------------------------------------ model
// The calibrated probabilities: softmax(logits / T), T from the metadata (1 when the model has none).
torch::Tensor forward(torch::jit::script::Module& model, const torch::Tensor& batch, const Meta& meta) {
    const int64_t n = batch.size(0);
    torch::Tensor x = batch;
    if (meta.fixed_batch > 0 && n < meta.fixed_batch) {  // a fixed-batch export: pad with zeros
        x = torch::cat({batch, torch::zeros({meta.fixed_batch - n, batch.size(1), batch.size(2), batch.size(3)})});
    }
    torch::Tensor logits = model.forward({x}).toTensor().to(torch::kFloat32);
    if (!meta.temperature.empty()) logits = logits / meta.temperature[0];
    return logits.softmax(1).slice(0, 0, n).contiguous();
}

int run(const Options& o) {
    std::string meta_text = o.meta.empty() ? slurp(o.model + ".json") : slurp(o.meta);
    std::string meta_where = o.meta.empty() ? o.model + ".json" : o.meta;
    if (!o.meta.empty() && meta_text.empty()) throw UsageError("--meta " + o.meta + ": not found or empty");
    torch::jit::script::Module model;
    if (!o.preprocess_only) {
        if (o.threads > 0) at::set_num_threads(o.threads);
        torch::jit::ExtraFilesMap extra{{"meta.json", ""}};
        try {
            model = torch::jit::load(o.model, torch::kCPU, extra);
        } catch (const c10::Error& err) {
            std::string what = err.what_without_backtrace();
            throw UsageError(o.model + " cannot be loaded as TorchScript (" + what.substr(0, what.find('\n')) + ")");
        }
        model.eval();
        if (meta_text.empty()) {
            meta_text = extra["meta.json"];
            meta_where = o.model + " (embedded meta.json)";
        }
        if (meta_text.empty())
            throw UsageError(o.model + " carries no metadata and " + o.model + ".json is missing beside it: export the model "
                             "with export.py, or copy its .json along with it");
    }
    const Meta meta = parse_meta(read_json(meta_text, meta_where), meta_where);
    if (meta.half && !o.preprocess_only)
        throw UsageError(o.model + " is a float16 export (--half): it needs a CUDA GPU; export a float32 model for the CPU");
    std::ofstream dump;
    if (!o.dump.empty()) {
        dump.open(o.dump, std::ios::binary);
        if (!dump) throw UsageError("--dump-input " + o.dump + ": cannot write");
    }
    const auto& spec = meta.spec;
    const int batch_size = meta.fixed_batch > 0 ? meta.fixed_batch : o.batch;
    c10::InferenceMode guard;
    using clock = std::chrono::steady_clock;
    const auto start = clock::now();
    double model_seconds = 0.0;
    int failed = 0, done = 0;
    for (size_t first = 0; first < o.images.size(); first += batch_size) {
        std::vector<std::string> paths;
        torch::Tensor batch = torch::empty({batch_size, spec.channels, spec.crop, spec.crop});
        for (size_t i = first; i < std::min(o.images.size(), first + batch_size); ++i) {
            std::vector<uint8_t> planar;
            try {
                planar = pcng::preprocess(pcng::load_image(o.images[i], spec.channels), spec);
            } catch (const pcng::DecodeError& err) {
                std::fprintf(stderr, "skipped %s: %s\n", o.images[i].c_str(), err.what());
                ++failed;
                continue;
            }
            if (dump) dump.write(reinterpret_cast<const char*>(planar.data()), static_cast<std::streamsize>(planar.size()));
            pcng::normalize(planar, spec, batch[static_cast<int64_t>(paths.size())].data_ptr<float>());
            paths.push_back(o.images[i]);
        }
        if (paths.empty() || o.preprocess_only) {
            done += static_cast<int>(paths.size());
            continue;
        }
        const auto before = clock::now();
        const torch::Tensor probs = forward(model, batch.slice(0, 0, static_cast<int64_t>(paths.size())), meta);
        model_seconds += std::chrono::duration<double>(clock::now() - before).count();
        print_rows(paths, probs, meta, o.all);
        done += static_cast<int>(paths.size());
    }
    std::fflush(stdout);
    const double seconds = std::chrono::duration<double>(clock::now() - start).count();
    std::fprintf(stderr, "%d images %s in %.3fs (%.1f images/s; the model %.3fs), %d skipped, %d thread(s)\n", done,
                 o.preprocess_only ? "preprocessed" : "classified", seconds, seconds > 0 ? done / seconds : 0.0, model_seconds,
                 failed, at::get_num_threads());
    return failed ? 1 : 0;
}

}  // namespace

int main(int argc, char** argv) {
    try {
        return run(parse_args(argc, argv));
    } catch (const UsageError& err) {
        std::fprintf(stderr, "error: %s\n", err.what());
        return 2;
    } catch (const std::exception& err) {
        std::fprintf(stderr, "error: %s\n", err.what());
        return 2;
    }
}
