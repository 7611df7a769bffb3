//! tract, the pure-Rust runtime: always available, and an oracle for ONNX Runtime.
//!
//! tract optimises a plan for one concrete input shape, and on CPU it is fastest at batch 1, so a
//! batch is run item by item through a plan for `[1, ...]`. Plans are built once per item shape
//! and shared by every instance; only the run state is per thread.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use tract_onnx::prelude::*;
use tract_onnx::tract_hir::internal::DimLike;

use crate::{Backend, BackendError, Exact, IoInfo, ModelInfo, Output, Result, Tensor};

type Plan = TypedSimplePlan;

pub(crate) struct TractModel(Arc<Inner>);

struct Inner {
    path: PathBuf,
    model: InferenceModel,
    info: ModelInfo,
    /// The element type the model's input takes: batches arrive as `f32` and are cast to it.
    input_type: DatumType,
    plans: Mutex<HashMap<Vec<usize>, Arc<Plan>>>,
}

impl std::fmt::Debug for TractModel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TractModel").field("path", &self.0.path).field("info", &self.0.info).finish_non_exhaustive()
    }
}

fn load_error(path: &Path, e: impl std::fmt::Display) -> BackendError {
    BackendError::Load { path: path.to_owned(), reason: format!("{e:#}") }
}

impl TractModel {
    pub(crate) fn load(path: &Path, bytes: &[u8]) -> Result<Self> {
        let onnx = tract_onnx::onnx();
        let proto = onnx.proto_model_for_read(&mut &bytes[..]).map_err(|e| load_error(path, e))?;
        let folder = crate::model_folder(path).to_str();
        let parsed = onnx.parse(&proto, folder).map_err(|e| load_error(path, e))?;
        if !parsed.unresolved_inputs.is_empty() {
            return Err(load_error(path, format!("inputs {:?} are not resolved", parsed.unresolved_inputs)));
        }
        let model = parsed.model;
        let typed = model.clone().into_typed().map_err(|e| load_error(path, e))?;
        let describe = |outlets: &[OutletId]| -> Result<Vec<IoInfo>> {
            outlets
                .iter()
                .map(|o| {
                    let fact = typed.outlet_fact(*o).map_err(|e| load_error(path, e))?;
                    Ok(IoInfo {
                        name: typed.outlet_label(*o).unwrap_or(&typed.node(o.node).name).to_string(),
                        dtype: onnx_type_name(fact.datum_type),
                        shape: fact.shape.iter().map(|d| d.to_usize().ok()).collect(),
                    })
                })
                .collect()
        };
        let info = ModelInfo { inputs: describe(&typed.inputs)?, outputs: describe(&typed.outputs)? };
        let input_type = match typed.inputs.first() {
            Some(&o) => typed.outlet_fact(o).map_err(|e| load_error(path, e))?.datum_type,
            None => DatumType::F32,
        };
        let plans = Mutex::new(HashMap::new());
        Ok(Self(Arc::new(Inner { path: path.to_owned(), model, info, input_type, plans })))
    }
}

impl Inner {
    fn plan(&self, item_shape: &[usize]) -> Result<Arc<Plan>> {
        let mut plans = self.plans.lock().expect("tract plan cache poisoned");
        if let Some(p) = plans.get(item_shape) {
            return Ok(p.clone());
        }
        let mut shape = vec![1];
        shape.extend_from_slice(item_shape);
        let fact = InferenceFact::dt_shape(self.input_type, &shape);
        let plan = self
            .model
            .clone()
            .with_input_fact(0, fact)
            .and_then(|m| m.into_optimized())
            .and_then(|m| m.into_runnable())
            .map_err(|e| load_error(&self.path, e))?;
        plans.insert(item_shape.to_vec(), plan.clone());
        Ok(plan)
    }
}

fn onnx_type_name(t: DatumType) -> String {
    match t {
        DatumType::F32 => "float".into(),
        DatumType::F64 => "double".into(),
        DatumType::F16 => "float16".into(),
        DatumType::I64 => "int64".into(),
        DatumType::I32 => "int32".into(),
        DatumType::U8 => "uint8".into(),
        DatumType::I8 => "int8".into(),
        DatumType::U16 => "uint16".into(),
        DatumType::I16 => "int16".into(),
        DatumType::U32 => "uint32".into(),
        DatumType::U64 => "uint64".into(),
        DatumType::Bool => "bool".into(),
        DatumType::String => "string".into(),
        other => format!("{other:?}").to_lowercase(),
    }
}

impl crate::Model for TractModel {
    fn info(&self) -> &ModelInfo {
        &self.0.info
    }

    fn runtime(&self) -> String {
        "tract 0.23".into()
    }

    fn instance(&self) -> Result<Box<dyn Backend>> {
        Ok(Box::new(TractBackend { model: self.0.clone() }))
    }
}

struct TractBackend {
    model: Arc<Inner>,
}

impl Backend for TractBackend {
    fn run(&mut self, input: &Tensor) -> Result<Vec<Output>> {
        let model = &self.model;
        crate::check_input(&model.info, &input.shape)?;
        let batch = input.shape[0];
        let plan = model.plan(&input.shape[1..])?;
        let mut item_shape = vec![1];
        item_shape.extend_from_slice(&input.shape[1..]);
        let mut outputs: Vec<(Vec<usize>, Values)> = Vec::new();
        for i in 0..batch {
            // Integer inputs arrive as whole values, which tract's cast keeps.
            let item = tract_onnx::prelude::Tensor::from_shape(&item_shape, input.row(i))
                .and_then(|t| t.cast_to_dt(model.input_type).map(|t| t.into_owned()))
                .map_err(|e| BackendError::Run(e.to_string()))?;
            let result = plan.run(tvec![item.into_tvalue()]).map_err(|e| BackendError::Run(format!("{e:#}")))?;
            if outputs.is_empty() {
                outputs = result.iter().map(|t| (t.shape().to_vec(), Values::for_type(t.datum_type()))).collect();
            }
            for ((slot, t), io) in outputs.iter_mut().zip(result.iter()).zip(&model.info.outputs) {
                slot.1.extend(t).map_err(|e| BackendError::Run(format!("output {}: {e:#}", io.name)))?;
            }
        }
        Ok(outputs
            .into_iter()
            .map(|(mut shape, values)| {
                if let Some(first) = shape.first_mut() {
                    *first = batch;
                }
                match values {
                    Values::Float(v) => Output::new(shape, v),
                    Values::Exact(e) => Output::exact(shape, e),
                }
            })
            .collect())
    }
}

/// An output's values gathered item by item: floats, or what [`Exact`] keeps.
enum Values {
    Float(Vec<f32>),
    Exact(Exact),
}

impl Values {
    fn for_type(t: DatumType) -> Self {
        match t {
            DatumType::Bool => Values::Exact(Exact::Bool(Vec::new())),
            DatumType::String => Values::Exact(Exact::Text(Vec::new())),
            t if t.is_integer() => Values::Exact(Exact::Int(Vec::new())),
            _ => Values::Float(Vec::new()),
        }
    }

    fn extend(&mut self, t: &tract_onnx::prelude::Tensor) -> std::result::Result<(), String> {
        let e = |e: TractError| format!("{e:#}");
        match self {
            Values::Float(v) if t.datum_type().is_float() => {
                v.extend(t.cast_to::<f32>().map_err(e)?.to_plain_array_view::<f32>().map_err(e)?.iter())
            }
            Values::Exact(Exact::Int(v)) => {
                v.extend(t.cast_to::<i64>().map_err(e)?.to_plain_array_view::<i64>().map_err(e)?.iter())
            }
            Values::Exact(Exact::Bool(v)) => v.extend(t.to_plain_array_view::<bool>().map_err(e)?.iter()),
            Values::Exact(Exact::Text(v)) => v.extend(t.to_plain_array_view::<String>().map_err(e)?.iter().cloned()),
            _ => return Err(format!("its element type is {:?}, which ferry does not write", t.datum_type())),
        }
        Ok(())
    }
}
