//! Tokenizer (`tokenizer.json`, the `tokenizers` crate) and chat template
//! (`tokenizer_config.json` or `chat_template.jinja`, rendered by minijinja),
//! applied to a prompt the way `mlx_lm.generate` does.

use std::path::Path;

use serde_json::Value;

use crate::error::{ModelError, Result};

pub struct Tokenizer {
    inner: tokenizers::Tokenizer,
    chat_template: Option<String>,
    bos_token: Option<String>,
    eos_token: Option<String>,
}

/// A special token in tokenizer_config.json is a string or `{"content": ...}`.
fn token_string(v: Option<&Value>) -> Option<String> {
    match v? {
        Value::String(s) => Some(s.clone()),
        Value::Object(o) => o.get("content").and_then(Value::as_str).map(String::from),
        _ => None,
    }
}

impl Tokenizer {
    /// `None` when the folder has no tokenizer.json (token ids only).
    pub fn load(dir: &Path) -> Result<Option<Self>> {
        let path = dir.join("tokenizer.json");
        if !path.exists() {
            return Ok(None);
        }
        let inner = tokenizers::Tokenizer::from_file(&path).map_err(|e| ModelError::file(&path, format!("cannot load tokenizer: {e}")))?;
        let cfg_path = dir.join("tokenizer_config.json");
        let cfg: Value = match std::fs::read_to_string(&cfg_path) {
            Ok(text) => serde_json::from_str(&text).map_err(|e| ModelError::file(&cfg_path, format!("not valid JSON: {e}")))?,
            Err(_) => Value::Null,
        };
        let mut chat_template = match cfg.get("chat_template") {
            Some(Value::String(s)) => Some(s.clone()),
            // A list of named templates: use "default".
            Some(Value::Array(list)) => list
                .iter()
                .find(|t| t.get("name").and_then(Value::as_str) == Some("default"))
                .and_then(|t| t.get("template").and_then(Value::as_str))
                .map(String::from),
            _ => None,
        };
        let jinja = dir.join("chat_template.jinja");
        if chat_template.is_none() && jinja.exists() {
            chat_template = Some(std::fs::read_to_string(&jinja).map_err(|e| ModelError::file(&jinja, format!("cannot read: {e}")))?);
        }
        Ok(Some(Tokenizer {
            inner,
            chat_template,
            bos_token: token_string(cfg.get("bos_token")),
            eos_token: token_string(cfg.get("eos_token")),
        }))
    }

    pub fn has_chat_template(&self) -> bool {
        self.chat_template.is_some()
    }

    pub fn eos_token_id(&self) -> Option<u32> {
        self.eos_token.as_deref().and_then(|t| self.inner.token_to_id(t))
    }

    /// `mlx_lm.generate`'s prompt handling: with a chat template, one user
    /// message rendered with `add_generation_prompt` and encoded without special
    /// tokens; without one, the raw prompt encoded with special tokens.
    pub fn encode_prompt(&self, prompt: &str, use_chat_template: bool) -> Result<Vec<u32>> {
        let prompt = prompt.replace("\\n", "\n").replace("\\t", "\t");
        match (&self.chat_template, use_chat_template) {
            (Some(template), true) => {
                let text = self.render_chat(template, &prompt)?;
                self.encode(&text, false)
            }
            _ => self.encode(&prompt, true),
        }
    }

    fn render_chat(&self, template: &str, prompt: &str) -> Result<String> {
        let mut env = minijinja::Environment::new();
        minijinja_contrib::add_to_environment(&mut env);
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.add_function("raise_exception", |msg: String| -> std::result::Result<String, minijinja::Error> {
            Err(minijinja::Error::new(minijinja::ErrorKind::InvalidOperation, msg))
        });
        env.add_template("chat", template).map_err(|e| ModelError::invalid(format!("chat template does not parse: {e}")))?;
        let ctx = minijinja::context! {
            messages => vec![minijinja::context! { role => "user", content => prompt }],
            add_generation_prompt => true,
            bos_token => self.bos_token.clone().unwrap_or_default(),
            eos_token => self.eos_token.clone().unwrap_or_default(),
        };
        env.get_template("chat")
            .and_then(|t| t.render(ctx))
            .map_err(|e| ModelError::invalid(format!("chat template failed: {e}")))
    }

    pub fn encode(&self, text: &str, add_special_tokens: bool) -> Result<Vec<u32>> {
        // mlx-lm skips special tokens when the text already starts with the BOS token.
        let add = add_special_tokens && self.bos_token.as_deref().is_none_or(|b| !text.starts_with(b));
        let enc = self.inner.encode(text, add).map_err(|e| ModelError::invalid(format!("tokenizer failed: {e}")))?;
        Ok(enc.get_ids().to_vec())
    }

    pub fn decode(&self, ids: &[u32]) -> String {
        self.inner.decode(ids, true).unwrap_or_default()
    }
}
