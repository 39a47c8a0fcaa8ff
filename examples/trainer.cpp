// A small C++ trainer that needs nothing but the C API of liblossc: it reads a loss
// as text from the command line, trains a per-pixel logistic model on synthetic masks
// with it (full batch, Adam), and prints the loss and the IoU on every epoch.
//
//   c++ -std=c++17 -Wall -Wextra -Werror examples/trainer.cpp -I include
//       -L target/release -llossc -Wl,-rpath,target/release -o trainer
//   ./trainer 'lovasz_hinge' 40
//   ./trainer '0.5*dice(sigmoid(x), y) + bce_logits(x, y)'
//
// The loss's inputs are chosen by name: `x` gets the model's logits, `p` their
// sigmoid (probabilities), `y` the target masks. The model's logit for a pixel is
// w0 * intensity + w1 * (3x3 mean intensity) + b, both standardised.
#include <algorithm>
#include <array>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <random>
#include <stdexcept>
#include <string>
#include <vector>

#include "lossc.h"

namespace {

constexpr int kImages = 16, kSide = 32, kPixels = kSide * kSide, kN = kImages * kPixels;
constexpr int kFeatures = 3;  // intensity, 3x3 mean, bias

// Owns a compiled loss; lossc_free on scope exit.
class Loss {
  public:
    Loss(const char *source, const char *params) {
        if (lossc_compile(source, params, &loss_) != LOSSC_STATUS_OK) throw std::runtime_error(lossc_last_error());
    }
    ~Loss() { lossc_free(loss_); }
    Loss(const Loss &) = delete;
    Loss &operator=(const Loss &) = delete;
    const lossc_loss *get() const { return loss_; }

  private:
    lossc_loss *loss_ = nullptr;
};

// Synthetic masks (one disc per image) and noisy images where the disc is brighter.
struct Data {
    std::vector<float> mask = std::vector<float>(kN);
    std::vector<std::array<float, kFeatures>> features = std::vector<std::array<float, kFeatures>>(kN);
};

Data make_data(unsigned seed) {
    Data d;
    std::mt19937 rng(seed);
    std::uniform_real_distribution<float> uni(0.0f, 1.0f);
    std::normal_distribution<float> noise(0.0f, 0.25f);
    std::vector<float> image(kN);
    for (int k = 0; k < kImages; k++) {
        float cx = 8 + 16 * uni(rng), cy = 8 + 16 * uni(rng), r = 4 + 6 * uni(rng);
        for (int i = 0; i < kPixels; i++) {
            float dx = float(i % kSide) - cx, dy = float(i / kSide) - cy;
            bool inside = dx * dx + dy * dy <= r * r;
            d.mask[k * kPixels + i] = inside ? 1.0f : 0.0f;
            image[k * kPixels + i] = (inside ? 0.7f : 0.3f) + noise(rng);
        }
    }
    for (int k = 0; k < kImages; k++) {
        for (int i = 0; i < kPixels; i++) {
            int px = i % kSide, py = i / kSide, count = 0;
            float sum = 0;
            for (int oy = -1; oy <= 1; oy++) {
                for (int ox = -1; ox <= 1; ox++) {
                    int qx = px + ox, qy = py + oy;
                    if (qx < 0 || qy < 0 || qx >= kSide || qy >= kSide) continue;
                    sum += image[k * kPixels + qy * kSide + qx];
                    count++;
                }
            }
            d.features[k * kPixels + i] = {image[k * kPixels + i], sum / float(count), 1.0f};
        }
    }
    // Standardise the two image features, so one learning rate suits every weight.
    for (int f = 0; f < 2; f++) {
        double mean = 0, var = 0;
        for (auto &x : d.features) mean += x[f] / kN;
        for (auto &x : d.features) var += (x[f] - mean) * (x[f] - mean) / kN;
        for (auto &x : d.features) x[f] = float((x[f] - mean) / std::sqrt(var));
    }
    return d;
}

double iou(const std::vector<float> &logits, const std::vector<float> &mask) {
    double inter = 0, uni = 0;
    for (int i = 0; i < kN; i++) {
        bool p = logits[i] > 0, y = mask[i] > 0.5f;
        inter += p && y;
        uni += p || y;
    }
    return uni > 0 ? inter / uni : 1.0;
}

float sigmoid(float x) { return 1.0f / (1.0f + std::exp(-x)); }

int run(const char *source, int epochs) {
    Loss loss(source, nullptr);
    const Data data = make_data(7);
    const size_t n_inputs = lossc_num_inputs(loss.get());
    std::vector<std::string> names;
    for (size_t i = 0; i < n_inputs; i++) {
        names.emplace_back(lossc_input_name(loss.get(), i));
        if (names.back() != "x" && names.back() != "p" && names.back() != "y") {
            std::fprintf(stderr, "trainer: input `%s` is not one of x (logits), p (probabilities), y (masks)\n",
                         names.back().c_str());
            return 2;
        }
    }
    std::printf("training %s(%s) on %d images of %dx%d, %zu term(s)\n", lossc_loss_name(loss.get()),
                [&] {
                    std::string s;
                    for (auto &n : names) s += (s.empty() ? "" : ", ") + n;
                    return s;
                }()
                    .c_str(),
                kImages, kSide, kSide, lossc_num_terms(loss.get()));

    std::vector<float> logits(kN), probs(kN), dlogits(kN), dprobs(kN), dmask(kN);
    std::array<double, kFeatures> w{}, m{}, v{};  // weights, Adam moments
    const double lr = 0.2, beta1 = 0.9, beta2 = 0.999;
    const lossc_shape shape{kImages, 1, kPixels};
    for (int epoch = 0; epoch <= epochs; epoch++) {
        for (int i = 0; i < kN; i++) {
            double z = 0;
            for (int f = 0; f < kFeatures; f++) z += w[f] * data.features[i][f];
            logits[i] = float(z);
            probs[i] = sigmoid(logits[i]);
        }
        std::vector<const float *> inputs;
        std::vector<float *> grads;
        for (auto &n : names) {
            inputs.push_back(n == "x" ? logits.data() : n == "p" ? probs.data() : data.mask.data());
            grads.push_back(n == "x" ? dlogits.data() : n == "p" ? dprobs.data() : dmask.data());
        }
        std::vector<lossc_shape> shapes(n_inputs, shape);
        double value = 0;
        if (lossc_eval(loss.get(), inputs.data(), shapes.data(), n_inputs, &value, grads.data()) != LOSSC_STATUS_OK) {
            std::fprintf(stderr, "trainer: %s", lossc_last_error());
            return 1;
        }
        std::printf("epoch %3d  loss %.6f  iou %.4f", epoch, value, iou(logits, data.mask));
        if (lossc_num_terms(loss.get()) > 1) {
            std::vector<double> terms(lossc_num_terms(loss.get()));
            double total = 0;
            lossc_eval_terms(loss.get(), inputs.data(), shapes.data(), n_inputs, terms.data(), terms.size(), &total);
            std::printf("  terms");
            for (double t : terms) std::printf(" %.6f", t);
        }
        std::printf("\n");
        if (epoch == epochs) break;

        // Chain rule to the weights: d/dx from `x`, plus d/dp * p (1 - p) from `p`.
        const bool has_x = std::count(names.begin(), names.end(), "x") > 0;
        const bool has_p = std::count(names.begin(), names.end(), "p") > 0;
        std::array<double, kFeatures> g{};
        for (int i = 0; i < kN; i++) {
            double d = (has_x ? dlogits[i] : 0.0f) + (has_p ? dprobs[i] * probs[i] * (1 - probs[i]) : 0.0f);
            for (int f = 0; f < kFeatures; f++) g[f] += d * data.features[i][f];
        }
        for (int f = 0; f < kFeatures; f++) {
            m[f] = beta1 * m[f] + (1 - beta1) * g[f];
            v[f] = beta2 * v[f] + (1 - beta2) * g[f] * g[f];
            double mh = m[f] / (1 - std::pow(beta1, epoch + 1)), vh = v[f] / (1 - std::pow(beta2, epoch + 1));
            w[f] -= lr * mh / (std::sqrt(vh) + 1e-8);
        }
    }
    return 0;
}

}  // namespace

int main(int argc, char **argv) {
    if (argc < 2 || argc > 3) {
        std::fprintf(stderr, "usage: %s LOSS [EPOCHS]\n", argv[0]);
        return 2;
    }
    try {
        return run(argv[1], argc == 3 ? std::atoi(argv[2]) : 40);
    } catch (const std::exception &e) {
        std::fprintf(stderr, "trainer: %s", e.what());
        return 1;
    }
}
