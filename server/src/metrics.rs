//! Prometheus metrics, served as text on `GET /metrics`. Process-wide, like the process itself.

use std::sync::OnceLock;

use prometheus_client::encoding::{EncodeLabelSet, EncodeLabelValue};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct TeacherLabel {
    pub teacher: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelValue)]
pub enum Outcome {
    Done,
    CacheHit,
    Failed,
    Requeued,
    Discarded,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct OutcomeLabel {
    pub teacher: String,
    pub outcome: Outcome,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelValue)]
pub enum TokenKind {
    Prompt,
    Completion,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct TokenLabel {
    pub teacher: String,
    pub kind: TokenKind,
}

pub struct Metrics {
    registry: Registry,
    pub generations: Family<OutcomeLabel, Counter>,
    pub teacher_retries: Family<TeacherLabel, Counter>,
    pub tokens: Family<TokenLabel, Counter>,
    pub in_flight: Family<TeacherLabel, Gauge>,
    pub latency: Family<TeacherLabel, Histogram>,
}

fn latency_histogram() -> Histogram {
    Histogram::new(exponential_buckets(0.01, 2.0, 16))
}

impl Metrics {
    fn new() -> Self {
        let mut registry = Registry::with_prefix("distill");
        let generations = Family::<OutcomeLabel, Counter>::default();
        let teacher_retries = Family::<TeacherLabel, Counter>::default();
        let tokens = Family::<TokenLabel, Counter>::default();
        let in_flight = Family::<TeacherLabel, Gauge>::default();
        let latency = Family::<TeacherLabel, Histogram>::new_with_constructor(latency_histogram as fn() -> Histogram);
        registry.register("generations", "Finished queue items by outcome", generations.clone());
        registry.register("teacher_retries", "Teacher requests retried (429, 5xx, timeouts, connection errors)", teacher_retries.clone());
        registry.register("tokens", "Tokens reported by teachers", tokens.clone());
        registry.register("teacher_in_flight", "Teacher requests in flight", in_flight.clone());
        registry.register("teacher_latency_seconds", "Latency of successful teacher requests", latency.clone());
        Metrics { registry, generations, teacher_retries, tokens, in_flight, latency }
    }

    /// Prometheus text exposition of every metric.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &self.registry).expect("writing to a String");
        out
    }

    pub fn outcome(&self, teacher: &str, outcome: Outcome) {
        self.generations.get_or_create(&OutcomeLabel { teacher: teacher.to_string(), outcome }).inc();
    }
}

pub fn global() -> &'static Metrics {
    static M: OnceLock<Metrics> = OnceLock::new();
    M.get_or_init(Metrics::new)
}
