#include "server/http_server.h"

#include <httplib.h>
#include <openssl/ssl.h>
#include <spdlog/spdlog.h>

#include <atomic>
#include <cmath>
#include <optional>
#include <string>
#include <thread>
#include <utility>
#include <vector>

#include "absl/container/flat_hash_map.h"
#include "absl/strings/ascii.h"
#include "absl/strings/escaping.h"
#include "absl/strings/match.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/synchronization/mutex.h"
#include "absl/synchronization/notification.h"
#include "absl/time/clock.h"
#include "server/http_a1111.h"
#include "server/http_json.h"
#include "server/http_openai.h"
#include "server/status_convert.h"
#include "tome/token_merging.h"

namespace tomeserve::server {

// The playground page (server/playground.html, embedded at build time).
extern const char kPlaygroundHtml[];

namespace {

constexpr const char* kJson = "application/json";

// The routes, as tomeserve_http_requests_total's route label; anything else is "other".
constexpr const char* kRoutes[] = {
    "/",
    "/healthz",
    "/readyz",
    "/v1/models",
    "/v1/images/generations",
    "/sdapi/v1/txt2img",
    "/sdapi/v1/sd-models",
    "/sdapi/v1/options",
    "/sdapi/v1/samplers",
    "/sdapi/v1/schedulers",
    "/sdapi/v1/scripts",
    "/sdapi/v1/progress",
    "/sdapi/v1/interrupt",
};

std::string RouteLabel(const std::string& path) {
  for (const char* r : kRoutes) {
    if (path == r) return r;
  }
  return "other";
}

enum class Api { kOpenAi, kA1111, kPlain };
Api ApiOf(const std::string& path) {
  if (absl::StartsWith(path, "/v1/")) return Api::kOpenAi;
  if (absl::StartsWith(path, "/sdapi/")) return Api::kA1111;
  return Api::kPlain;
}

// A1111 answers validation errors (and features it cannot run) with 422, as FastAPI does.
int HttpCode(Api api, const absl::Status& status) {
  if (api == Api::kA1111 && (status.code() == absl::StatusCode::kInvalidArgument ||
                             status.code() == absl::StatusCode::kUnimplemented))
    return 422;
  if (api == Api::kOpenAi && status.code() == absl::StatusCode::kUnimplemented) return 400;
  return HttpStatusCode(status.code());
}

void SendJson(httplib::Response& res, int code, const nlohmann::json& body) {
  res.status = code;
  res.set_content(body.dump(-1, ' ', false, nlohmann::json::error_handler_t::replace), kJson);
}

void SendError(httplib::Response& res, Api api, const absl::Status& status) {
  const int code = HttpCode(api, status);
  switch (api) {
    case Api::kOpenAi: SendJson(res, code, OpenAiError(status, code)); break;
    case Api::kA1111: SendJson(res, code, A1111Error(status, code)); break;
    case Api::kPlain:
      res.status = code;
      res.set_content(absl::StrCat(status.message(), "\n"), "text/plain");
      break;
  }
}

// The Authorization header as the token check reads it: "Bearer T" as sent, "Basic base64(user:T)" as
// "Bearer T" (A1111 clients use HTTP Basic; the password is the token).
std::optional<std::string> Authorization(const httplib::Request& req) {
  if (!req.has_header("Authorization")) return std::nullopt;
  std::string value = req.get_header_value("Authorization");
  if (absl::StartsWithIgnoreCase(value, "Basic ")) {
    std::string decoded;
    if (absl::Base64Unescape(absl::StripAsciiWhitespace(absl::string_view(value).substr(6)), &decoded)) {
      const size_t colon = decoded.find(':');
      if (colon != std::string::npos) return absl::StrCat("Bearer ", decoded.substr(colon + 1));
    }
  }
  return value;
}

// UNAUTHENTICATED messages from the token check speak of gRPC metadata; over HTTP the header is meant.
absl::Status ForHttp(const absl::Status& status, bool sent_header) {
  if (status.code() == absl::StatusCode::kUnauthenticated && !sent_header) {
    return absl::UnauthenticatedError(
        "this server requires a token: send the header \"Authorization: Bearer <token>\"");
  }
  return status;
}

// One generate call over HTTP: the job's observer. OnDone records the call (the same log line and metrics as
// gRPC) and wakes the handler thread waiting in Wait().
class HttpCall final : public JobObserver {
 public:
  HttpCall(GenerateFront* front, std::string route, v1::GenerateRequest request, absl::Time started)
      : front_(front), route_(std::move(route)), request_(std::move(request)), started_(started) {}

  const v1::GenerateRequest& request() const { return request_; }
  std::string* tenant() { return &tenant_; }
  const std::string& tenant_name() const { return tenant_; }
  void set_job(std::shared_ptr<Job> job) { job_ = std::move(job); }
  const std::shared_ptr<Job>& job() const { return job_; }
  absl::Time started() const { return started_; }

  void OnQueued(const QueuedInfo& info) override { estimated_finish_.store(info.estimated_finish_seconds); }
  void OnProgress(int step, int num_steps) override {
    num_steps_.store(num_steps);
    step_.store(step);
    estimated_finish_.store(-1);
  }
  void OnDone(const absl::StatusOr<GenerationResult>& result) override {
    front_->Record(route_, request_, job_.get(), tenant_, result, started_);
    {
      absl::MutexLock lock(&mu_);
      result_ = result;
    }
    done_.Notify();
  }

  // Blocks until OnDone; the result.
  absl::StatusOr<GenerationResult> Wait() {
    done_.WaitForNotification();
    absl::MutexLock lock(&mu_);
    return std::move(*result_);
  }
  bool done() const { return done_.HasBeenNotified(); }
  int step() const { return step_.load(); }
  int num_steps() const { return num_steps_.load(); }
  double estimated_finish() const { return estimated_finish_.load(); }
  void MarkInterrupted() { interrupted_.store(true); }
  bool interrupted() const { return interrupted_.load(); }

 private:
  GenerateFront* const front_;
  const std::string route_;
  const v1::GenerateRequest request_;
  const absl::Time started_;
  std::string tenant_;  // set by MakeJob once authenticated
  std::shared_ptr<Job> job_;
  std::atomic<int> step_{0}, num_steps_{0};
  std::atomic<double> estimated_finish_{-1};
  std::atomic<bool> interrupted_{false};
  absl::Mutex mu_;
  std::optional<absl::StatusOr<GenerationResult>> result_ ABSL_GUARDED_BY(mu_);
  absl::Notification done_;
};

}  // namespace

struct HttpServer::Impl {
  GenerateFront* front = nullptr;
  Metrics* metrics = nullptr;
  std::unique_ptr<httplib::Server> server;
  int port = 0;
  std::thread thread;
  std::atomic<bool> ready{false};
  std::atomic<bool> live{true};
  std::atomic<bool> listen_returned{false};

  absl::Mutex mu;
  // Per tenant: A1111 options, the calls in flight and the latest call (for /sdapi/v1/progress and interrupt).
  absl::flat_hash_map<std::string, A1111Options> a1111_options ABSL_GUARDED_BY(mu);
  absl::flat_hash_map<std::string, std::vector<std::shared_ptr<HttpCall>>> in_flight ABSL_GUARDED_BY(mu);
  absl::flat_hash_map<std::string, std::shared_ptr<HttpCall>> latest ABSL_GUARDED_BY(mu);
  int calls ABSL_GUARDED_BY(mu) = 0;

  // The caller's tenant, or the error to answer with.
  absl::StatusOr<std::string> Tenant(const httplib::Request& req) const {
    std::optional<std::string> authorization = Authorization(req);
    absl::StatusOr<TenantSpec> tenant =
        front->Authenticate(authorization ? std::optional<absl::string_view>(*authorization) : std::nullopt);
    if (!tenant.ok()) return ForHttp(tenant.status(), authorization.has_value());
    return tenant->name;
  }

  // The request's deadline from X-Request-Timeout (seconds), or INVALID_ARGUMENT.
  static absl::StatusOr<absl::Time> Deadline(const httplib::Request& req, absl::Time now) {
    if (!req.has_header("X-Request-Timeout")) return absl::InfiniteFuture();
    double seconds = 0;
    const std::string value = req.get_header_value("X-Request-Timeout");
    if (!absl::SimpleAtod(value, &seconds) || !std::isfinite(seconds) || seconds <= 0 || seconds > 86400) {
      return absl::InvalidArgumentError(absl::StrCat("X-Request-Timeout is \"", absl::CHexEscape(value.substr(0, 32)),
                                                     "\"; allowed: seconds in (0, 86400]"));
    }
    return now + absl::Seconds(seconds);
  }

  // Runs one generate call through the shared front and waits for it. On success `effective` is the request
  // as it ran. Status messages keep the proto's field names (the caller renames them for its API).
  absl::StatusOr<v1::GenerateResponse> Generate(const httplib::Request& req, const std::string& route,
                                                v1::GenerateRequest request, GenerationRequest* effective) {
    const absl::Time started = absl::Now();
    auto call = std::make_shared<HttpCall>(front, route, std::move(request), started);
    std::optional<std::string> authorization = Authorization(req);
    absl::StatusOr<absl::Time> deadline = Deadline(req, started);
    absl::StatusOr<std::shared_ptr<Job>> job =
        deadline.ok() ? front->MakeJob(authorization ? std::optional<absl::string_view>(*authorization) : std::nullopt,
                                       *deadline, call->request(), call.get(), call->tenant())
                      : absl::StatusOr<std::shared_ptr<Job>>(deadline.status());
    if (!job.ok()) {
      front->Record(route, call->request(), nullptr, call->tenant_name(), job.status(), started);
      return ForHttp(job.status(), authorization.has_value());
    }
    call->set_job(*job);
    Track(call);
    front->Submit(call->job());
    absl::StatusOr<GenerationResult> result = call->Wait();
    Untrack(call);
    if (!result.ok()) {
      if (call->interrupted()) {
        return absl::CancelledError(absl::StrCat("interrupted by POST /sdapi/v1/interrupt at step ", call->step(),
                                                 " of ", call->num_steps()));
      }
      return result.status();
    }
    v1::GenerateResponse response;
    ToProto(call->job()->request(), *result, &response);
    *effective = call->job()->request();
    return response;
  }

  void Track(const std::shared_ptr<HttpCall>& call) {
    absl::MutexLock lock(&mu);
    in_flight[call->tenant_name()].push_back(call);
    latest[call->tenant_name()] = call;
    ++calls;
  }
  void Untrack(const std::shared_ptr<HttpCall>& call) {
    absl::MutexLock lock(&mu);
    auto& v = in_flight[call->tenant_name()];
    std::erase(v, call);
    --calls;
  }

  // ---- OpenAI ----
  void OpenAiGenerate(const httplib::Request& req, httplib::Response& res) {
    absl::StatusOr<nlohmann::json> body = ParseJsonObject(req.body);
    absl::StatusOr<v1::GenerateRequest> request = body.ok() ? OpenAiImageRequest(*body) : body.status();
    // Authentication comes first: an unauthenticated caller learns nothing about validation.
    if (absl::StatusOr<std::string> tenant = Tenant(req); !tenant.ok()) return SendError(res, Api::kOpenAi, tenant.status());
    if (!request.ok()) return SendError(res, Api::kOpenAi, request.status());
    GenerationRequest effective;
    absl::StatusOr<v1::GenerateResponse> response = Generate(req, "POST /v1/images/generations", *request, &effective);
    if (!response.ok()) return SendError(res, Api::kOpenAi, OpenAiFieldNames(response.status()));
    SendJson(res, 200, OpenAiImageResponse(*request, *response, absl::Now()));
  }

  void OpenAiModelsRoute(const httplib::Request& req, httplib::Response& res) {
    if (absl::StatusOr<std::string> tenant = Tenant(req); !tenant.ok()) return SendError(res, Api::kOpenAi, tenant.status());
    const ModelCatalog* catalog = front->catalog();
    if (catalog == nullptr) return SendError(res, Api::kOpenAi, Loading());
    SendJson(res, 200, OpenAiModels(*catalog));
  }

  // ---- AUTOMATIC1111 ----
  A1111Options OptionsOf(const std::string& tenant) {
    absl::MutexLock lock(&mu);
    auto it = a1111_options.find(tenant);
    return it == a1111_options.end() ? A1111Options{} : it->second;
  }

  void Txt2Img(const httplib::Request& req, httplib::Response& res) {
    absl::StatusOr<std::string> tenant = Tenant(req);
    if (!tenant.ok()) return SendError(res, Api::kA1111, tenant.status());
    absl::StatusOr<nlohmann::json> body = ParseJsonObject(req.body);
    if (!body.ok()) return SendError(res, Api::kA1111, body.status());
    absl::StatusOr<v1::GenerateRequest> request = A1111Txt2ImgRequest(*body, OptionsOf(*tenant));
    if (!request.ok()) return SendError(res, Api::kA1111, request.status());
    const absl::Time started = absl::Now();
    GenerationRequest effective;
    absl::StatusOr<v1::GenerateResponse> response = Generate(req, "POST /sdapi/v1/txt2img", *request, &effective);
    if (!response.ok()) return SendError(res, Api::kA1111, A1111FieldNames(response.status()));
    SendJson(res, 200, A1111Txt2ImgResponse(*body, effective, *response, started));
  }

  // A listing route: authenticated, after the models are loaded.
  template <typename F>
  void A1111Listing(const httplib::Request& req, httplib::Response& res, F make) {
    absl::StatusOr<std::string> tenant = Tenant(req);
    if (!tenant.ok()) return SendError(res, Api::kA1111, tenant.status());
    const ModelCatalog* catalog = front->catalog();
    if (catalog == nullptr) return SendError(res, Api::kA1111, Loading());
    SendJson(res, 200, make(*tenant, *catalog));
  }

  void SetOptions(const httplib::Request& req, httplib::Response& res) {
    absl::StatusOr<std::string> tenant = Tenant(req);
    if (!tenant.ok()) return SendError(res, Api::kA1111, tenant.status());
    const ModelCatalog* catalog = front->catalog();
    if (catalog == nullptr) return SendError(res, Api::kA1111, Loading());
    absl::StatusOr<nlohmann::json> body = ParseJsonObject(req.body);
    if (!body.ok()) return SendError(res, Api::kA1111, body.status());
    A1111Options options = OptionsOf(*tenant);
    if (absl::Status s = ApplyA1111Options(*body, *catalog, &options); !s.ok()) return SendError(res, Api::kA1111, s);
    if (options.token_merging_ratio &&
        (*options.token_merging_ratio < 0 || *options.token_merging_ratio > tome::MaxRatio(2, 2))) {
      return SendError(res, Api::kA1111,
                       absl::InvalidArgumentError(absl::StrCat("token_merging_ratio is ", *options.token_merging_ratio,
                                                               "; allowed: [0, ", tome::MaxRatio(2, 2), "]")));
    }
    {
      absl::MutexLock lock(&mu);
      a1111_options[*tenant] = options;
    }
    SendJson(res, 200, nullptr);
  }

  void Progress(const httplib::Request& req, httplib::Response& res) {
    absl::StatusOr<std::string> tenant = Tenant(req);
    if (!tenant.ok()) return SendError(res, Api::kA1111, tenant.status());
    std::shared_ptr<HttpCall> call;
    int running = 0;
    {
      absl::MutexLock lock(&mu);
      if (auto it = latest.find(*tenant); it != latest.end()) call = it->second;
      if (auto it = in_flight.find(*tenant); it != in_flight.end()) running = static_cast<int>(it->second.size());
    }
    nlohmann::json state = {{"skipped", false},       {"interrupted", false}, {"stopping_generation", false},
                            {"job", ""},              {"job_count", running}, {"job_timestamp", "0"},
                            {"job_no", 0},            {"sampling_step", 0},   {"sampling_steps", 0}};
    double progress = 0, eta = 0;
    nlohmann::json task = nullptr;
    if (call != nullptr) {
      state["interrupted"] = call->interrupted();
      state["job_timestamp"] = absl::FormatTime("%Y%m%d%H%M%S", call->started(), absl::UTCTimeZone());
      task = call->job() != nullptr ? nlohmann::json(call->job()->request().request_id) : nlohmann::json(nullptr);
      if (!call->done()) {
        const int step = call->step(), steps = call->num_steps();
        state["job"] = "txt2img";
        state["sampling_step"] = step;
        state["sampling_steps"] = steps;
        const double elapsed = absl::ToDoubleSeconds(absl::Now() - call->started());
        if (steps > 0 && step > 0) {
          progress = static_cast<double>(step) / steps;
          eta = elapsed * (steps - step) / step;
        } else if (call->estimated_finish() >= 0) {
          eta = call->estimated_finish();
        }
      }
    }
    SendJson(res, 200,
             {{"progress", progress}, {"eta_relative", eta}, {"state", state}, {"current_image", nullptr},
              {"textinfo", nullptr}, {"current_task", task}});
  }

  void Interrupt(const httplib::Request& req, httplib::Response& res) {
    absl::StatusOr<std::string> tenant = Tenant(req);
    if (!tenant.ok()) return SendError(res, Api::kA1111, tenant.status());
    std::vector<std::shared_ptr<HttpCall>> calls_now;
    {
      absl::MutexLock lock(&mu);
      if (auto it = in_flight.find(*tenant); it != in_flight.end()) calls_now = it->second;
    }
    for (const auto& call : calls_now) {
      call->MarkInterrupted();
      front->Cancel(call->job().get());
    }
    SendJson(res, 200, nullptr);
  }

  static absl::Status Loading() { return absl::UnavailableError("the server is loading its models; retry shortly"); }

  void Routes() {
    httplib::Server& s = *server;
    s.Get("/healthz", [this](const httplib::Request&, httplib::Response& res) {
      res.status = live.load() ? 200 : 503;
      res.set_content(live.load() ? "ok\n" : "a worker left service\n", "text/plain");
    });
    s.Get("/readyz", [this](const httplib::Request&, httplib::Response& res) {
      res.status = ready.load() ? 200 : 503;
      res.set_content(ready.load() ? "ready\n" : "not ready: loading or draining\n", "text/plain");
    });
    s.Get("/", [](const httplib::Request&, httplib::Response& res) {
      res.set_content(kPlaygroundHtml, "text/html; charset=utf-8");
    });
    s.Post("/v1/images/generations", [this](const httplib::Request& q, httplib::Response& r) { OpenAiGenerate(q, r); });
    s.Get("/v1/models", [this](const httplib::Request& q, httplib::Response& r) { OpenAiModelsRoute(q, r); });
    s.Post("/sdapi/v1/txt2img", [this](const httplib::Request& q, httplib::Response& r) { Txt2Img(q, r); });
    s.Get("/sdapi/v1/sd-models", [this](const httplib::Request& q, httplib::Response& r) {
      A1111Listing(q, r, [](const std::string&, const ModelCatalog& c) { return A1111Models(c); });
    });
    s.Get("/sdapi/v1/samplers", [this](const httplib::Request& q, httplib::Response& r) {
      A1111Listing(q, r, [](const std::string&, const ModelCatalog&) { return A1111Samplers(); });
    });
    s.Get("/sdapi/v1/schedulers", [this](const httplib::Request& q, httplib::Response& r) {
      A1111Listing(q, r, [](const std::string&, const ModelCatalog&) { return A1111Schedulers(); });
    });
    s.Get("/sdapi/v1/scripts", [this](const httplib::Request& q, httplib::Response& r) {
      A1111Listing(q, r, [](const std::string&, const ModelCatalog&) {
        return nlohmann::json{{"txt2img", nlohmann::json::array()}, {"img2img", nlohmann::json::array()}};
      });
    });
    s.Get("/sdapi/v1/options", [this](const httplib::Request& q, httplib::Response& r) {
      A1111Listing(q, r, [this](const std::string& tenant, const ModelCatalog& c) {
        return A1111OptionsJson(OptionsOf(tenant), c, front->limits().default_tome_ratio);
      });
    });
    s.Post("/sdapi/v1/options", [this](const httplib::Request& q, httplib::Response& r) { SetOptions(q, r); });
    s.Get("/sdapi/v1/progress", [this](const httplib::Request& q, httplib::Response& r) { Progress(q, r); });
    s.Post("/sdapi/v1/interrupt", [this](const httplib::Request& q, httplib::Response& r) { Interrupt(q, r); });

    // Errors httplib answers itself (404 no route, 413 body too large, 400 unreadable request) in the API's shape.
    s.set_error_handler(httplib::Server::HandlerWithResponse([](const httplib::Request& req, httplib::Response& res) {
      if (!res.body.empty()) return httplib::Server::HandlerResponse::Unhandled;
      absl::Status status;
      if (res.status == 404) {
        status = absl::NotFoundError(absl::StrCat("no route ", req.method, " ", absl::CHexEscape(req.path.substr(0, 128))));
      } else if (res.status == 413) {
        status = absl::ResourceExhaustedError("the request body is larger than this server accepts (--max-request-bytes)");
      } else if (res.status == 405) {
        status = absl::InvalidArgumentError(absl::StrCat("method ", req.method, " is not allowed here"));
      } else {
        status = absl::InvalidArgumentError(absl::StrCat("the request could not be read (HTTP ", res.status, ")"));
      }
      const int code = res.status;
      const Api api = ApiOf(req.path);
      if (api == Api::kOpenAi) SendJson(res, code, OpenAiError(status, code));
      else if (api == Api::kA1111) SendJson(res, code, A1111Error(status, code));
      else res.set_content(absl::StrCat(status.message(), "\n"), "text/plain");
      res.status = code;
      return httplib::Server::HandlerResponse::Handled;
    }));
    s.set_exception_handler([](const httplib::Request& req, httplib::Response& res, std::exception_ptr ep) {
      std::string what = "unknown error";
      try {
        if (ep) std::rethrow_exception(ep);
      } catch (const std::exception& e) {
        what = e.what();
      } catch (...) {
      }
      spdlog::error("HTTP {} {}: {}", req.method, absl::CHexEscape(req.path.substr(0, 128)), what);
      SendError(res, ApiOf(req.path), absl::InternalError("internal error"));
    });
    s.set_logger([this](const httplib::Request& req, const httplib::Response& res) {
      metrics->CountHttpRequest(RouteLabel(req.path), res.status);
    });
  }
};

HttpServer::HttpServer(std::unique_ptr<Impl> impl) : impl_(std::move(impl)) {}

HttpServer::~HttpServer() {
  Stop();
  Join();
}

absl::StatusOr<std::unique_ptr<HttpServer>> HttpServer::Start(const HttpServerOptions& options, GenerateFront* front,
                                                               Metrics* metrics) {
  auto impl = std::make_unique<Impl>();
  impl->front = front;
  impl->metrics = metrics;
  if (options.tls_cert.empty()) {
    impl->server = std::make_unique<httplib::Server>();
  } else {
    auto tls = std::make_unique<httplib::SSLServer>(
        options.tls_cert.c_str(), options.tls_key.c_str(),
        options.tls_client_ca.empty() ? nullptr : options.tls_client_ca.c_str());
    if (!tls->is_valid()) {
      return absl::InvalidArgumentError(absl::StrCat("--http-listen: cannot use --tls-cert ", options.tls_cert,
                                                     " / --tls-key ", options.tls_key,
                                                     options.tls_client_ca.empty() ? "" : " / --tls-client-ca ",
                                                     options.tls_client_ca, " (unreadable or not matching PEM files)"));
    }
    // OpenSSL refuses to resume a session on a server that verifies client certificates unless the server
    // names a session id context: without it every reconnect of a client that resumes (Envoy does) fails its
    // handshake. httplib does not set one.
    static constexpr unsigned char kSessionContext[] = "tomeserve-http";
    SSL_CTX_set_session_id_context(tls->ssl_context(), kSessionContext, sizeof(kSessionContext) - 1);
    impl->server = std::move(tls);
  }
  httplib::Server& s = *impl->server;
  const int threads = std::max(1, options.threads);
  s.new_task_queue = [threads] { return new httplib::ThreadPool(static_cast<size_t>(threads)); };
  s.set_payload_max_length(options.max_body_bytes);
  s.set_read_timeout(30, 0);
  s.set_write_timeout(60, 0);
  s.set_keep_alive_timeout(5);
  s.set_keep_alive_max_count(1000);  // httplib's default closes a connection after 5 requests
  s.set_tcp_nodelay(true);
  impl->Routes();

  const size_t colon = options.listen.rfind(':');
  std::string host = options.listen.substr(0, colon);
  if (host.size() >= 2 && host.front() == '[' && host.back() == ']') host = host.substr(1, host.size() - 2);
  int port = 0;
  if (colon == std::string::npos || !absl::SimpleAtoi(options.listen.substr(colon + 1), &port)) {
    return absl::InvalidArgumentError(absl::StrCat("--http-listen: expected HOST:PORT, got \"", options.listen, "\""));
  }
  const int bound = port == 0 ? s.bind_to_any_port(host) : (s.bind_to_port(host, port) ? port : -1);
  if (bound <= 0) {
    return absl::UnavailableError(absl::StrCat("cannot listen on ", options.listen,
                                               " (--http-listen): the address is in use or not available"));
  }
  impl->port = bound;
  Impl* raw = impl.get();
  impl->thread = std::thread([raw] {
    raw->server->listen_after_bind();
    raw->listen_returned.store(true);
  });
  return std::unique_ptr<HttpServer>(new HttpServer(std::move(impl)));
}

int HttpServer::port() const { return impl_->port; }
void HttpServer::SetReady(bool ready) { impl_->ready.store(ready); }
void HttpServer::SetLive(bool live) { impl_->live.store(live); }
void HttpServer::Stop() {
  if (!impl_->thread.joinable()) return;
  // httplib's stop() does nothing before its listen loop has begun: wait for it (it begins at once).
  for (int i = 0; i < 5000 && !impl_->server->is_running() && !impl_->listen_returned.load(); ++i)
    absl::SleepFor(absl::Milliseconds(1));
  impl_->server->stop();
}

void HttpServer::AwaitCalls(absl::Time deadline) {
  Impl& i = *impl_;
  absl::MutexLock lock(&i.mu);
  auto idle = [&i]() ABSL_EXCLUSIVE_LOCKS_REQUIRED(i.mu) { return i.calls == 0; };
  i.mu.AwaitWithDeadline(absl::Condition(&idle), deadline);
}

void HttpServer::Join() {
  if (impl_->thread.joinable()) impl_->thread.join();
}

}  // namespace tomeserve::server
