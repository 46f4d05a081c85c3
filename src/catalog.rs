//! Models, aliases and prices: resolves a requested name into the ranked chain a key may use.

use std::collections::HashMap;

use crate::config::{Config, Model, Provider};
use crate::money::Nanos;
use crate::usage::Usage;

/// What a name in requests refers to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Target {
    Model(usize),
    /// Index into `Catalog::aliases`.
    Alias(usize),
}

/// Immutable view of the configured models, built once at start-up.
pub struct Catalog {
    models: Vec<Model>,
    providers: Vec<Provider>,
    by_name: HashMap<String, Target>,
    /// Alias names, sorted, for listings.
    alias_names: Vec<String>,
    /// Chains by alias index.
    alias_chains: Vec<Vec<usize>>,
}

/// Up to this many models in one chain are tried; configuration refuses longer aliases.
pub const MAX_CHAIN: usize = crate::config::MAX_ALIAS_MODELS;

/// The models a request may be served by, best first.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Chain {
    models: [u16; MAX_CHAIN],
    len: u8,
}

impl Chain {
    pub fn push(&mut self, m: usize) {
        if (self.len as usize) < MAX_CHAIN {
            self.models[self.len as usize] = m as u16;
            self.len += 1;
        }
    }

    pub fn get(&self, i: usize) -> Option<usize> {
        (i < self.len as usize).then(|| self.models[i] as usize)
    }

    pub fn len(&self) -> usize {
        self.len as usize
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    pub fn contains(&self, m: usize) -> bool {
        self.models[..self.len()].contains(&(m as u16))
    }

    /// The chain without the models `keep` refuses, in the same order.
    pub fn filtered(&self, mut keep: impl FnMut(usize) -> bool) -> Chain {
        let mut out = Chain::default();
        for i in 0..self.len() {
            let m = self.models[i] as usize;
            if keep(m) {
                out.push(m);
            }
        }
        out
    }
}

impl Catalog {
    /// No models: for the key operations that name none (revocation with a config that
    /// does not load whole).
    pub fn empty() -> Catalog {
        Catalog {
            models: Vec::new(),
            providers: Vec::new(),
            by_name: HashMap::new(),
            alias_names: Vec::new(),
            alias_chains: Vec::new(),
        }
    }

    pub fn new(config: &Config) -> Catalog {
        let mut by_name = HashMap::new();
        for (i, m) in config.models.iter().enumerate() {
            by_name.insert(m.id.clone(), Target::Model(i));
        }
        let mut alias_names = Vec::new();
        let mut alias_chains = Vec::new();
        for (name, chain) in &config.aliases {
            by_name.insert(name.clone(), Target::Alias(alias_chains.len()));
            alias_names.push(name.clone());
            alias_chains.push(chain.clone());
        }
        Catalog {
            models: config.models.clone(),
            providers: config.providers.clone(),
            by_name,
            alias_names,
            alias_chains,
        }
    }

    pub fn models(&self) -> &[Model] {
        &self.models
    }

    pub fn providers(&self) -> &[Provider] {
        &self.providers
    }

    pub fn provider_of(&self, m: usize) -> &Provider {
        &self.providers[self.models[m].provider]
    }

    pub fn model_index(&self, name: &str) -> Option<usize> {
        match self.by_name.get(name) {
            Some(Target::Model(m)) => Some(*m),
            _ => None,
        }
    }

    pub fn alias_index(&self, name: &str) -> Option<usize> {
        match self.by_name.get(name) {
            Some(Target::Alias(a)) => Some(*a),
            _ => None,
        }
    }

    pub fn alias_chain(&self, name: &str) -> Option<&[usize]> {
        self.alias_index(name)
            .map(|a| self.alias_chains[a].as_slice())
    }

    pub fn alias_names(&self) -> &[String] {
        &self.alias_names
    }

    /// The model or alias `name` names, if any.
    pub fn target(&self, name: &str) -> Option<Target> {
        self.by_name.get(name).copied()
    }

    /// The models of alias `a` (an index from [`Catalog::target`]), in fallback order.
    pub fn alias_models(&self, a: usize) -> &[usize] {
        &self.alias_chains[a]
    }

    /// The cost of `usage` on model `m` (saturating: never wraps). Each input token is
    /// priced once: cache reads and writes at their own prices when configured, the rest at
    /// the input price.
    pub fn cost(&self, m: usize, usage: &Usage) -> Nanos {
        let model = &self.models[m];
        let units = model
            .unit_price
            .map_or(Nanos::ZERO, |p| p.cost(usage.units));
        let read = model.cache_read_price.unwrap_or(model.input_price);
        let write = model.cache_write_price.unwrap_or(model.input_price);
        model.input_price.cost(usage.uncached_prompt_tokens())
            + read.cost(usage.cache_read_tokens.min(usage.prompt_tokens))
            + write.cost(
                usage
                    .cache_write_tokens
                    .min(usage.prompt_tokens.saturating_sub(usage.cache_read_tokens)),
            )
            + model.output_price.cost(usage.completion_tokens)
            + units
    }

    /// Whether model `m` has a token price (input, output or cache).
    pub fn has_token_price(&self, m: usize) -> bool {
        let model = &self.models[m];
        [
            Some(model.input_price),
            Some(model.output_price),
            model.cache_read_price,
            model.cache_write_price,
        ]
        .into_iter()
        .flatten()
        .any(|p| p != crate::money::Price::FREE)
    }

    /// Whether model `m` has a unit price (`usd_per_image`, `usd_per_mchar`,
    /// `usd_per_minute`).
    pub fn has_unit_price(&self, m: usize) -> bool {
        self.models[m].unit_price.is_some()
    }

    /// Whether model `m` serves `family`'s endpoints: only its own (SPEC §3; a model with no
    /// `endpoint` set is a chat model).
    pub fn serves(&self, m: usize, family: crate::config::Family) -> bool {
        self.models[m].family == family
    }

    /// The most `prompt_tokens` and `completion_tokens` can cost on model `m`, however the
    /// provider splits the prompt into cache reads and writes: every input token at the
    /// highest input-side price.
    pub fn bound_cost(&self, m: usize, prompt_tokens: u64, completion_tokens: u64) -> Nanos {
        self.bound_cost_with_units(m, prompt_tokens, completion_tokens, 0)
    }

    /// [`Catalog::bound_cost`] plus `units` at the model's unit price (images, characters,
    /// milliseconds of audio): a bound whether the provider reports tokens or units.
    pub fn bound_cost_with_units(
        &self,
        m: usize,
        prompt_tokens: u64,
        completion_tokens: u64,
        units: u64,
    ) -> Nanos {
        let model = &self.models[m];
        let units = model.unit_price.map_or(Nanos::ZERO, |p| p.cost(units));
        let input = [model.cache_read_price, model.cache_write_price]
            .into_iter()
            .flatten()
            .fold(model.input_price, |a, b| a.max(b));
        input.cost(prompt_tokens) + model.output_price.cost(completion_tokens) + units
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use std::path::Path;

    pub(crate) fn catalog() -> Catalog {
        let yaml = r#"
listen: "127.0.0.1:8080"
database: "x.db"
providers: [{name: p, kind: openai, base_url: "http://127.0.0.1:1/v1"}]
models:
  - {id: paid, provider: p, input_usd_per_mtok: 1, output_usd_per_mtok: 2}
  - {id: free, provider: p, input_usd_per_mtok: 0, output_usd_per_mtok: 0, free: true}
  - {id: other, provider: p, input_usd_per_mtok: 1, output_usd_per_mtok: 2}
aliases:
  fast: [free, paid]
"#;
        Catalog::new(&Config::parse(yaml, Path::new("t.yaml")).unwrap())
    }

    #[test]
    fn cost_is_integer_nanos() {
        let c = catalog();
        // 1 USD/Mtok = 1000 nano-USD per token.
        assert_eq!(
            c.cost(0, &Usage::new(1_000, 500)),
            Nanos::new(1_000 * 1_000 + 500 * 2_000)
        );
        assert_eq!(c.cost(0, &Usage::new(u64::MAX, u64::MAX)), Nanos::MAX);
        assert_eq!(c.bound_cost(0, u64::MAX, u64::MAX), Nanos::MAX);
    }
}
