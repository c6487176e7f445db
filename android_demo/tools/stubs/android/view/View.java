package android.view;

public class View {
    public static final int FOCUS_DOWN = 130;
    public interface OnClickListener { void onClick(View v); }
    public void setOnClickListener(OnClickListener l) { throw new RuntimeException("stub"); }
    public boolean post(Runnable action) { throw new RuntimeException("stub"); }
    public boolean isEnabled() { throw new RuntimeException("stub"); }
    public void setEnabled(boolean enabled) { throw new RuntimeException("stub"); }
}
